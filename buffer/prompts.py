"""Prompt dispenser: the hub hands out prompts so that generators (including ones that join later) never
duplicate or skip a prompt. Order is a per-epoch permutation seeded by `rollout_seed`; the cursor is
(epoch, position) and fully determines what comes next.
"""
from __future__ import annotations

import random


class PromptDispenser:
    def __init__(self, prompts: list[dict], shuffle: bool, seed: int):
        self.prompts = prompts
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._order_for(0)

    def _order_for(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(self.seed * 100_003 + epoch).shuffle(order)
        return order

    def sync_order(self) -> None:
        """Recompute the permutation after the cursor was restored (from a snapshot or log record)."""
        self._order = self._order_for(self.epoch)

    def next(self) -> tuple[int, dict]:
        """(prompt index, prompt) and advance the cursor, wrapping into the next epoch."""
        if self.position >= len(self._order):
            self.epoch += 1
            self.position = 0
            self._order = self._order_for(self.epoch)
        index = self._order[self.position]
        self.position += 1
        return index, self.prompts[index]


class PromptLeases:
    """Which granted prompts are still owed a group, so the prompts of a lost generator are dispensed again.

    Every prompt a GRANT hands out is a ticket `(t, prompt_index)`, held by its generator until a PUT or DROP
    of a group for that prompt resolves it. When the generator is declared lost (reclaim: silent past
    `buffer.generator_timeout`, or a resumed run), its tickets go to the `reissue` queue, which the next
    GRANTs serve before the dispenser's cursor moves on, and stay `late` on that generator: it may be
    partitioned rather than dead and PUT them after all. A ticket yields at most one group: the first PUT or
    DROP that resolves it counts, a later one for it (the late generator's, or the re-grantee's) is acked as
    a duplicate and not stored. So every prompt of an epoch yields exactly one group (or one DROP).

    Invariants: a ticket is held by at most one generator at a time, plus any number of late ones; a ticket is
    in `reissue` only while unresolved; a credit is released only by resolving a held ticket (a late one's
    credit was released by the reclaim). Changed only through HubState.apply (grant, put, drop, reclaim), so
    a replayed log rebuilds it exactly. A group whose prompt matches no ticket (a log or snapshot from before
    tickets, a custom rollout that invents prompts) resolves nothing and releases its credit, as before.
    """

    def __init__(self):
        self.next_ticket = 0
        self.held: dict[str, list[list[int]]] = {}   # gid -> [[ticket, prompt_index]] granted, unresolved
        self.late: dict[str, list[list[int]]] = {}   # gid -> tickets taken back from it; it may still PUT them
        self.reissue: list[list[int]] = []           # [[ticket, prompt_index]] to grant again, oldest first
        self.lost: dict[int, bool] = {}              # ticket ever taken back -> resolved yet

    def grant(self, gid: str, indices: list[int], reissued: int) -> None:
        """`indices` granted to `gid`; the first `reissued` of them are the head of the reissue queue."""
        taken, self.reissue = self.reissue[:reissued], self.reissue[reissued:]
        fresh = [[self.next_ticket + i, p] for i, p in enumerate(indices[reissued:])]
        self.next_ticket += len(fresh)
        self.held.setdefault(gid, []).extend(taken + fresh)

    def candidates(self, gid: str, prompt_index: int) -> list[tuple[int, bool]]:
        """The tickets a group of `gid` for `prompt_index` resolves, in the order successive groups take them:
        (ticket, held) for its held ones, then its late ones."""
        return ([(t, True) for t, p in self.held.get(gid, ()) if p == prompt_index]
                + [(t, False) for t, p in self.late.get(gid, ()) if p == prompt_index])

    def first(self, ticket: int | None) -> bool:
        """Whether a group resolving `ticket` is the first for it (None: no ticket, always first)."""
        return ticket is None or not self.lost.get(ticket, False)

    def resolve(self, gid: str, prompt_index: int) -> tuple[bool, bool]:
        """A group (or DROP) of `gid` for `prompt_index`: (release its credit, it is the prompt's first)."""
        found = self.candidates(gid, prompt_index)
        if not found:
            return True, True
        ticket, held = found[0]
        entries = (self.held if held else self.late)[gid]
        entries.remove(next(e for e in entries if e[0] == ticket))
        first = self.first(ticket)
        if ticket in self.lost:
            self.lost[ticket] = True
            self.reissue = [e for e in self.reissue if e[0] != ticket]
        return held, first

    def reclaim(self, gid: str) -> int:
        """`gid` is lost: its held tickets go to the reissue queue (and stay late on it); how many."""
        taken = self.held.pop(gid, [])
        for t, _ in taken:
            self.lost.setdefault(t, False)
        self.late.setdefault(gid, []).extend(taken)
        again = [e for e in taken if not self.lost[e[0]]]  # (one a late PUT resolved needs no group)
        self.reissue.extend(again)
        return len(again)

    def state(self) -> dict:
        return {"next_ticket": self.next_ticket, "held": self.held, "late": self.late, "reissue": self.reissue,
                "lost": [[t, r] for t, r in self.lost.items()]}

    def restore(self, s: dict | None) -> None:
        """From `state()`; None (a snapshot from before tickets) leaves it empty."""
        if s:
            self.next_ticket, self.reissue = int(s["next_ticket"]), [list(e) for e in s["reissue"]]
            self.held = {g: [list(e) for e in v] for g, v in s["held"].items()}
            self.late = {g: [list(e) for e in v] for g, v in s["late"].items()}
            self.lost = {int(t): bool(r) for t, r in s["lost"]}
