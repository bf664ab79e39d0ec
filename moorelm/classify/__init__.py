"""Text classification with pretrained Hugging Face encoders (BERT family; the bundled
MiniLM-L6 by default): labelled files in, a fine-tuned classifier and its metrics out.

Import the modules, which depend on each other one way
(``metrics`` <- ``data`` <- ``encoder`` <- ``train``, ``predict``):

- ``data``: read and check labelled CSV/TSV/JSONL files (``read_labeled``, ``read_texts``,
  ``read_table``), the label order and id maps, seeded stratified splits (``prepare_splits``).
  Standard library only; every backend, moorelm's GPT classifier included, trains on it.
- ``metrics``: accuracy, F1 and the confusion matrix, its PNG, the printed summary.
- ``encoder``: where a ``--model`` lives and loading it, never running a folder's own code
  and never unpickling weights.
- ``train``: ``finetune_classifier``, the ``transformers.Trainer`` job; resumable, and the
  output folder appears whole.
- ``predict``: ``classify`` / ``classify_file`` run a saved classifier.

Nothing here imports moorelm's GPT; the classifier on a moorelm run is
``moorelm.finetune.gpt_classifier``, built on ``data`` and ``metrics``.
"""
