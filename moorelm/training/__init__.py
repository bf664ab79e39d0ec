"""Training a language model: the loop and the pieces it is made of, one job per module.

    loop.py           train(): set up, the step loop, finish            (moorelm.train)
    pretrain.py       pretrain(): corpus -> prepared data -> configs -> train()  (moorelm.pretrain)
    setup.py          set_up(): device, model, optimizer, wrapping, resume; returns a Setup
    state.py          TrainState (what a checkpoint restores) and TrainResult (what train returns)
    checkpointing.py  the loop's reads and writes of the run folder; the model codec seam
    distributed.py    torchrun ranks, DDP/FSDP wrapping, gathering and sharding tensors
    validation.py     estimate_loss(): the validation loss on fixed batches
    metrics.py        metrics.csv rows and the loss window between log lines

Nothing is re-exported here: import each name from its module.
"""
