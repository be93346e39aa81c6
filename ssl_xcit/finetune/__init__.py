"""Supervised fine-tuning of a (DINO-)pretrained XCiT into a classifier, on the engine pretraining
stands on (:mod:`ssl_xcit.engine`): ``launch/finetune.py``, :func:`ssl_xcit.finetune.loop.train`. Imports
nothing of :mod:`ssl_xcit.train`."""
