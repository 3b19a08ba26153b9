"""The machine-learning core of fine-tuning, in plain Python: no Django, no database.

Each module takes paths, configs and iterables, so it runs from a script or a test
with nothing else set up; the services wrap them and record what they did.

- ``retrieval``: a lexical index of past exchanges (customer message, reply, intent),
  saved beside a dataset; the nearest exchanges ground every reply.
- ``intent``: the classifier that tells which intent a reply answers (the quality gate's
  intent accuracy).
- ``grounding``: the one prompt builder that puts retrieved exchanges into the prompt,
  used alike by training, evaluation and serving.
- ``decoding``: repetition controls for generation (transformers' logits processors,
  applied to the generated tokens only).
- ``quality``: reply-quality measures (template slots, repeated sentences, ROUGE-L,
  intent accuracy) and the retrieval baseline built on the index.
- ``packing``: training batches without padding waste (several short examples per row).
"""
