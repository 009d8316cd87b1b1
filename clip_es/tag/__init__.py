"""Image-level tags from a class list alone (zero-shot), for ``clipes label``, ``clipes tags``
and :class:`~clip_es.labeler.Labeler` when no labels are given.

One module per tagger, one registry entry each (:data:`~clip_es.tag.registry.TAGGERS`):

- ``blend`` (:mod:`clip_es.tag.blend`, the default): both below on the same image, a class
  kept when the geometric mean of their two scores reaches a threshold (they must agree).
- ``global`` (:mod:`clip_es.tag.global_softmax`): one softmax over the classes
  of the whole image's embedding, a class kept above a probability threshold.
- ``tagclip`` (:mod:`clip_es.tag.tagclip`): TagCLIP's local-to-global rule (Lin et al., AAAI
  2024): per-patch scores refined through the attention, then a second look at each
  candidate's crop. Finds small objects beside large ones.

Nothing is imported here, so importing the package costs nothing.
"""
