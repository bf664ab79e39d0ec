"""Inference: many requests decoded together by one model (continuous batching).

The parts, each in its own module (import names from the module that defines them):

    sequence   what a client asks for (``Request``) and gets back (``TokenEvent`` through a
               ``RequestHandle``), and one choice being decoded (``Sequence``)
    limits     ``ModelLimits``: the one check of a request against the model
    scheduler  the waiting queue and the batch slots: admission, leaving, compaction; each
               step it plans which prompts to prefill
    runner     the model over the batched KV cache: prefill prompts, decode one token per
               active slot, return logits
    sampler    every active sequence's next token, from its own settings and generator
    output     token ids to text: streaming without split characters, stop strings,
               finish reasons, log-probabilities
    engine     ``Engine``: the background thread and its step loop

The server (``moorelm.serve``) speaks HTTP on top of ``Engine``; fine-tuning's scorer uses it
directly. Nothing here knows HTTP.
"""
