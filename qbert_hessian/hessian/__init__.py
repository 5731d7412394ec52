"""Hessian estimators over one block of parameters: HVPs, power iteration, Hutchinson traces, the Q-BERT protocol."""
