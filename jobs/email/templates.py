"""The emails we send, as Jinja2 templates: `render(name, **context) -> RenderedEmail`.

Each email `<name>` is three files in `templates/`: `<name>.subject.txt`, `<name>.html`
(autoescaped: user-supplied names cannot inject markup) and `<name>.txt` (plain text, not
escaped: it is never interpreted as HTML). Undefined variables raise (StrictUndefined), so a
job that forgets a value fails in tests, not in a customer's inbox. `REQUIRED_CONTEXT` lists
what each email needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import jinja2

# What every template may use; each email's own extra variables are listed in REQUIRED_CONTEXT.
#   name: str | None      the person's name, or None (templates then greet generically)
#   app_url: str          where the product lives, for links
REQUIRED_CONTEXT: dict[str, frozenset[str]] = {
    "welcome": frozenset({"name", "app_url"}),
    "waitlist_confirm": frozenset({"name", "confirm_url", "expires_days"}),
    "waitlist_1": frozenset({"name", "app_url", "unsubscribe_url"}),
    "waitlist_2": frozenset({"name", "app_url", "unsubscribe_url"}),
    "waitlist_3": frozenset({"name", "app_url", "unsubscribe_url"}),
    "trial_ending": frozenset({"name", "app_url", "trial_ends_at", "days_left"}),
    "trial_expired": frozenset({"name", "app_url"}),
}
TEMPLATE_NAMES = tuple(REQUIRED_CONTEXT)


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


@cache
def _environment(autoescape: bool) -> jinja2.Environment:
    # Built once per process and flavour; PackageLoader reads the files shipped in the wheel
    # (pyproject's package-data), wherever the package is installed.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("jobs.email", "templates"),
        autoescape=autoescape,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=False,
        # The files ship with the code: checking each one's mtime at every render (two stat
        # calls a template, three templates an email) was a fifth of a campaign's CPU.
        auto_reload=False,
    )


def render(name: str, /, **context: Any) -> RenderedEmail:
    """Render email `name` (positional-only, so `name=` is free for the person's name).

    Raises `KeyError` for an unknown email, `jinja2.UndefinedError` for a missing variable.
    """
    if name not in REQUIRED_CONTEXT:
        raise KeyError(f"no email template {name!r}; known: {', '.join(TEMPLATE_NAMES)}")
    missing = REQUIRED_CONTEXT[name] - context.keys()
    if missing:
        raise jinja2.UndefinedError(f"email {name!r} needs {', '.join(sorted(missing))}")
    text_env = _environment(autoescape=False)
    subject = text_env.get_template(f"{name}.subject.txt").render(context)
    return RenderedEmail(
        # A subject is one header line: newlines in a user's name must not make a second one.
        subject=" ".join(subject.split()),
        html=_environment(autoescape=True).get_template(f"{name}.html").render(context),
        text=text_env.get_template(f"{name}.txt").render(context).strip() + "\n",
    )
