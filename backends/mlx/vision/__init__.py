"""Vision-language models on the MLX engine, with mlx-vlm.

mlx-vlm knows the architectures (vision towers, projectors, how image
features replace image tokens) and the processors (resizing, crops, how many
tokens an image becomes); mlxgate keeps its own engine around them:

- ``arch``: is a model folder a VLM mlx-vlm can run (cheap: config.json only);
- ``loader``: the model, its processor, and a text view of its language model
  that mlx-lm's ``BatchGenerator`` drives like any text model;
- ``images``: decoding, after ``backends/images.py`` passed the headers;
- ``detail``: what OpenAI's ``detail: "low"`` changes before the processor
  (a smaller image, no tiling);
- ``prompt``: a request's prompt with the model's chat template and
  processor (image tokens expanded, pixel inputs, the key the prompt cache
  files it under: image tokens keyed by the images' content);
- ``prefill``: on the MLX thread, a sequence's images through the vision
  tower (at admission) and its prompt through the language model into a KV
  cache, a paced chunk per engine step (the same ``PrefillPacer`` that sizes
  the batch's own prompt chunks), which then joins the model's batch exactly
  as a prompt-cache hit does;
- ``mrope``: the text view of Qwen2-VL / Qwen2.5-VL, whose image tokens sit
  on a grid of rotary positions: each sequence's position offset rides in
  its cache list, and every batched call gets each row's positions;
- ``families``, ``testmodel`` and ``testmodel_qwen``: the generated tiny model
  of each architecture served with images (``make-test-model --vision --arch``).

So decoding is one batch for image and text requests alike; text-only
requests to a VLM never touch the vision tower or processor; the prompt part holding
images is prefilled in chunks between decode steps, so running streams keep
their pace (several image prompts admitted together each advance a chunk per
step, each in its own forward pass: mlx-lm's batch takes token ids, not
embeddings).
"""
