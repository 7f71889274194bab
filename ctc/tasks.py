"""Model task names: the one spelling used by capture (``Module.meta["task"]``), the eval
harness, the recipe checker and the driver."""

TASK_ENCODER = "encoder"  # hidden states out (sentence embeddings by mean pooling)
TASK_CAUSAL_LM = "causal_lm"  # next-token logits out
TASK_DECODE_STEP = "decode_step"  # one generation step over preallocated KV caches: logits and caches out
TASKS = (TASK_ENCODER, TASK_CAUSAL_LM, TASK_DECODE_STEP)
