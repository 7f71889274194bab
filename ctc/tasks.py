"""Model task names: the one spelling used by capture (``Module.meta["task"]``), the eval
harness, the recipe checker and the driver."""

TASK_ENCODER = "encoder"  # hidden states out (sentence embeddings by mean pooling)
TASK_CAUSAL_LM = "causal_lm"  # next-token logits out
TASKS = (TASK_ENCODER, TASK_CAUSAL_LM)
