"""Recovery after pruning: a little training that keeps what the pruning achieved.

``data`` turns text into training and held-out windows, ``masks`` keeps a sparse model's zeros,
``lora`` wraps and merges adapters through ``peft``, ``distill`` holds the teacher losses,
``train`` the loop (checkpoints, resume, held-out loss) and ``schedule`` the gradual-pruning
sparsity schedule. The stages that use them are :mod:`pare.methods.recover` and
:mod:`pare.methods.gradual`.
"""
