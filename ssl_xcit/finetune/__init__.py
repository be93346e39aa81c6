"""Supervised fine-tuning of a (DINO-)pretrained XCiT into a classifier, on the run machinery
pretraining has (:mod:`ssl_xcit.engine.run`): ``launch/finetune.py``, :func:`ssl_xcit.finetune.loop.train`."""
