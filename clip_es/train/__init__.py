"""Stage 4: the lightweight segmenter trained on the pseudo masks (SPEC section 4).

* :mod:`~clip_es.train.model`: timm CNN + neck + fusion blocks + text-matching head;
* :mod:`~clip_es.train.losses`: confidence-guided CE, sigmoid focal + dice;
* :mod:`~clip_es.train.data`: label sources, augmentation, resumable step sampler;
* :mod:`~clip_es.train.text`: class text from the run's CLIP, cached;
* :mod:`~clip_es.train.loop`: ``TrainConfig``, ``train_segmenter`` (the loop, resume);
* :mod:`~clip_es.train.checkpoint`: checkpoint files (``last.pt``, weights-only ``model.pt``);
* :mod:`~clip_es.train.distributed`: torchrun / DDP set-up;
* :mod:`~clip_es.train.segment`: ``segment`` / ``load_segmenter`` (inference, open vocabulary);
* :mod:`~clip_es.train.onnx_export`: ``export_onnx``.

Nothing is imported here, so ``import clip_es.train`` stays cheap.
"""
