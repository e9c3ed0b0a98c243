"""Agents for DRRL-Attention-v0: features extractor, oracle and behaviour cloning, PPO training, evaluation.

The top floor of the layout: it imports ``drrl_gym``, never the other way round.
"""
