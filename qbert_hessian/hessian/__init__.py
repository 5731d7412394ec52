"""Hessian estimators over one block of parameters: HVPs, power iteration, Lanczos, Hutchinson traces, densities.

Pure math below ``models``: the Q-BERT protocol that runs them over a model's blocks is ``qbert_hessian.sensitivity``.
"""
