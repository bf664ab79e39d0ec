"""Look inside a model: per-token probabilities, attention maps and the logit lens.

    from moorelm.inspect import inspect
    result = inspect(lm.model, lm.tokenizer, "ROMEO:\\nBut soft", max_new_tokens=20)
    print(terminal(result))                       # tokens coloured by probability
    save_html(result, "inspect.html")             # hover a token: its alternatives
    save_attention_png(result, "attention.png")   # layers x heads grid
    save_lens_png(result, "lens.png")             # what each layer would predict

(``lm.inspect(prompt, ...)`` is the same on a ``LanguageModel``.) ``core`` computes,
``render`` draws; ``moorelm inspect RUN --prompt TEXT`` is the command line.
"""

from moorelm.inspect.core import Inspection, TokenScore, Trace, inspect, trace
from moorelm.inspect.render import (
    html_page,
    lens_table,
    save_attention_png,
    save_html,
    save_lens_png,
    terminal,
)

__all__ = ["Inspection", "TokenScore", "Trace", "html_page", "inspect", "lens_table",
           "save_attention_png", "save_html", "save_lens_png", "terminal", "trace"]
