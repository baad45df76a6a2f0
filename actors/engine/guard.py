"""What keeps an engine reachable beyond loopback from being an open door (the embedded engine; SGLang gets
the same API key through its own `--api-key`).

- API key: with one set, every request but `/health` must carry `Authorization: Bearer KEY` (SGLang's
  scheme); anything else is answered 401 before it is parsed. The key is compared in constant time.
- Weight store: with stores named, `/update_weights_from_disk` loads only a checkpoint dir inside one of
  them (resolved: `..` and symlinks cannot step out); any other path is refused and the old weights stay.
"""
from __future__ import annotations

import hmac
from pathlib import Path

OPEN_PATHS = ("/health",)  # liveness only: says nothing and changes nothing


class Guard:
    def __init__(self, api_key: str | None = None, stores: list[str] | tuple = ()):
        self.api_key = api_key or None
        self.stores = [Path(s).resolve() for s in stores]

    def authorized(self, path: str, header: str | None) -> bool:
        if self.api_key is None or path in OPEN_PATHS:
            return True
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self.api_key.encode())

    def refuse_path(self, model_path: str) -> str | None:
        """Why loading `model_path` is refused (None when it is allowed)."""
        if not self.stores:
            return None
        target = Path(model_path).resolve()
        if any(target == s or s in target.parents for s in self.stores):
            return None
        return (f"model_path={model_path!r}: outside this engine's weight store ({[str(s) for s in self.stores]}); "
                f"engines load only published versions of their run")
