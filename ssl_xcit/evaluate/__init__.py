"""Evaluation of frozen backbones: k-NN (faiss), linear probes, feature export.

Kept light on purpose: import the tool you need (``ssl_xcit.evaluate.knn``, ``.linear``,
``.export``, ``.features``); nothing heavy (faiss, torchvision) is imported here.
"""
