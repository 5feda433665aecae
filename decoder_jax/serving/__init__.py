"""An OpenAI-compatible HTTP server over `inference.generate_batch` (`python -m
decoder_jax.serve`).

  protocol   request bodies checked and turned into decode jobs; response bodies and
             stream chunks in the OpenAI shapes (no web framework needed)
  streaming  token ids to text deltas that never take back what they sent
  batcher    the queue and the one worker thread that owns the model: requests with the
             same decode settings share one decode call
  engine     that call: inference.generate_batch over the batch's rows
  app        the FastAPI app (`make_app`) tying them together
"""
