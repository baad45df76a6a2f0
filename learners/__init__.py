"""Learners: the RL math, the torch learner, weight publication."""
