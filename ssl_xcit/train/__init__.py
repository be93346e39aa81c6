"""DINO pretraining on the engine (:mod:`ssl_xcit.engine`): its config sections, builders, step, loop,
time budget, health warnings and ``recipe: auto`` rules. Imports nothing of :mod:`ssl_xcit.finetune`."""
