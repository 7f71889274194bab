"""Model task names: the one spelling used by capture (``Module.meta["task"]``), the eval
harness, the recipe checker and the driver.  Recipes may write them with dashes
(``task="causal-lm"``); :func:`normalize_task` maps that spelling to this one."""

TASK_ENCODER = "encoder"  # text encoder: hidden states out (sentence embeddings by mean pooling)
TASK_CAUSAL_LM = "causal_lm"  # next-token logits out
TASK_SEQ2SEQ = "seq2seq_lm"  # encoder-decoder (text or speech in): decoder logits out
TASK_IMAGE_CLASSIFICATION = "image_classification"  # class logits out
TASK_VISION = "vision_encoder"  # image features out
TASK_AUDIO = "audio_encoder"  # audio features out
TASK_DECODE_STEP = "decode_step"  # one generation step over preallocated KV caches: logits and caches out
# what a model is loaded as (a decode step is captured from a causal LM, not loaded)
MODEL_TASKS = (TASK_ENCODER, TASK_CAUSAL_LM, TASK_SEQ2SEQ, TASK_IMAGE_CLASSIFICATION, TASK_VISION, TASK_AUDIO)
TASKS = (*MODEL_TASKS, TASK_DECODE_STEP)


def normalize_task(task: str) -> str:
    """``"causal-lm"`` -> ``"causal_lm"`` (recipes may use dashes)."""
    return task.strip().lower().replace("-", "_")
