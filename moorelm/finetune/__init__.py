"""Fine-tuning moorelm's own GPTs for downstream tasks.

- ``sft``: prompt -> completion fine-tuning (full or LoRA, ``lora``), on tasks of ``tasks``.
- ``gpt_classifier``: a classification head on a GPT trunk, trained on the labelled files of
  ``moorelm.classify.data``.
- ``genre``: a demo classification set (Shakespeare passage -> genre of its play) built from
  the bundled corpus, split by play.

Text classification with pretrained Hugging Face encoders is ``moorelm.classify``.
"""
