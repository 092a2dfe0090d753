"""Agents built on diffmpc: imitation, RL through the MPC head, baselines, evaluation, the CLI."""
