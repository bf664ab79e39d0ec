"""EleutherAI's lm-evaluation-harness on a moorelm run, offline.

The parts, each in its own module (import names from the module that defines them):

    lm        ``MoorelmLM``: lm-eval's model interface over a loaded run (log-likelihoods
              through ``moorelm.scoring``, generation through the inference engine, the run's
              chat template)
    tasks     which tasks a list of names and files means: the bundled tasks of
              ``moorelm/tasks/``, the user's task files, the harness' own catalogue; one
              line for names that do not exist and data that would have to be downloaded
    evaluate  ``evaluate_run``: the tasks on a run, a results table, an atomic JSON file;
              what ``moorelm eval`` calls

Nothing here imports ``lm_eval`` when it is imported: ``evaluate_run`` does, and says in
one line how to install it when it is missing.
"""
