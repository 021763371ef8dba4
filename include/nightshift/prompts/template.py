"""A prompt template: a system prompt and optional few-shot examples, with ``{{ variables }}``.

Templates are written as YAML in ``include/configs/prompts/<name>.yaml`` (their source) and released as versions of
MLflow's Prompt Registry (prompts/registry.py), where a version is a chat template: a list of ``{"role",
"content"}`` messages in MLflow's double-brace format. The same template object renders the messages a model
reads in the evaluation harness and on the endpoint, so what the gate measured is what is served.

A variable's value comes from the template's defaults, or from a request (``prompt_variables``, only names the
template declares, each at most ``MAX_VALUE_CHARS``). Values are inserted as text: a value that spells
``{{ other }}`` stays that text, it is never expanded again.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nightshift.configs import read_yaml_mapping

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
VARIABLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]{0,63})\s*\}\}")
MAX_SYSTEM_CHARS = 8_000
MAX_EXAMPLES = 16
MAX_EXAMPLE_CHARS = 2_000
MAX_VARIABLES = 16
MAX_VALUE_CHARS = 200
MAX_DESCRIPTION_CHARS = 500
CONTROL = re.compile(r"<\|[^<>|]{0,40}\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>|<\|?(?:im_start|im_end|"
                     r"endoftext|eot_id|begin_of_text|start_header_id|end_header_id)", re.IGNORECASE)
"""Control sequences of common chat templates (ChatML, Llama 2 and 3, Mistral, Gemma): a request value holding one
could close the operator's system message and open turns of its own. The endpoint also refuses the loaded
tokenizer's own special tokens (serving/server.py)."""
ROLES = ("user", "assistant")


class PromptError(ValueError):
    """A template (a file, a registry version or a request's values) is not valid; the message says what to change."""


@dataclass(frozen=True)
class PromptTemplate:
    """A system prompt with few-shot examples; every ``{{ name }}`` it uses is a declared variable."""

    name: str
    system: str
    examples: tuple[tuple[str, str], ...] = ()
    """(user, assistant) turns shown before the conversation, in order."""
    variables: dict[str, str] = field(default_factory=dict)
    """Declared variables and their default values."""
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise PromptError("a prompt's name must be 1 to 64 letters, digits, '_' or '-', starting with a letter or "
                              "digit")
        where = f"prompt {self.name}"
        if not isinstance(self.system, str) or not self.system.strip() or len(self.system) > MAX_SYSTEM_CHARS:
            raise PromptError(f"{where}: system must be a non-empty text of at most {MAX_SYSTEM_CHARS} characters")
        if len(self.examples) > MAX_EXAMPLES:
            raise PromptError(f"{where}: at most {MAX_EXAMPLES} examples")
        for i, pair in enumerate(self.examples, start=1):
            if len(pair) != 2 or not all(isinstance(t, str) and t.strip() and len(t) <= MAX_EXAMPLE_CHARS
                                         for t in pair):
                raise PromptError(f"{where}: examples[{i}] needs a user and an assistant text of at most "
                                  f"{MAX_EXAMPLE_CHARS} characters")
        if len(self.variables) > MAX_VARIABLES:
            raise PromptError(f"{where}: at most {MAX_VARIABLES} variables")
        for key, value in self.variables.items():
            if not isinstance(key, str) or not VARIABLE.fullmatch("{{" + key + "}}"):
                raise PromptError(f"{where}: variable names are letters, digits and '_' (at most 64), not starting "
                                  "with a digit")
            if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
                raise PromptError(f"{where}: variables.{key} must be a text of at most {MAX_VALUE_CHARS} characters")
        used = set(self.used())
        undeclared = sorted(used - set(self.variables))
        if undeclared:
            raise PromptError(f"{where}: {{{{ {undeclared[0]} }}}} is used but not declared under variables")
        unused = sorted(set(self.variables) - used)
        if unused:
            raise PromptError(f"{where}: variables.{unused[0]} is declared but used nowhere")
        if not isinstance(self.description, str) or len(self.description) > MAX_DESCRIPTION_CHARS:
            raise PromptError(f"{where}: description must be a text of at most {MAX_DESCRIPTION_CHARS} characters")

    def used(self) -> list[str]:
        """Return the variable names the texts use, in order of first use."""
        texts = [self.system, *(t for pair in self.examples for t in pair)]
        return list(dict.fromkeys(m.group(1) for text in texts for m in VARIABLE.finditer(text)))

    # -- rendering ----------------------------------------------------------------------------------------------

    def values(self, given: dict[str, Any] | None = None) -> dict[str, str]:
        """Return the variables' values: the defaults, with ``given`` (a request's) over them; PromptError names a
        value that is not declared or not a short text."""
        out = dict(self.variables)
        for key, value in (given or {}).items():
            if key not in self.variables:
                raise PromptError(f"prompt_variables: {str(key)[:64]!r} is not a variable of prompt {self.name} "
                                  f"(it has: {', '.join(sorted(self.variables)) or 'none'})")
            if not isinstance(value, str) or len(value) > MAX_VALUE_CHARS:
                raise PromptError(f"prompt_variables.{key} must be a text of at most {MAX_VALUE_CHARS} characters")
            if CONTROL.search(value):
                raise PromptError(f"prompt_variables.{key} holds a chat-template control sequence (such as "
                                  "<|im_end|> or [INST]): a value is text inside the operator's prompt, not a turn")
            out[key] = value
        return out

    def _fill(self, text: str, values: dict[str, str]) -> str:
        # One pass: a value is inserted as it is, never read again for placeholders.
        return VARIABLE.sub(lambda m: values[m.group(1)], text)

    def preamble(self, given: dict[str, Any] | None = None) -> list[dict[str, str]]:
        """Return the messages this template puts before a conversation: the system prompt, then the examples."""
        values = self.values(given)
        out = [{"role": "system", "content": self._fill(self.system, values)}]
        for user, assistant in self.examples:
            out += [{"role": "user", "content": self._fill(user, values)},
                    {"role": "assistant", "content": self._fill(assistant, values)}]
        return out

    def apply(self, messages: list[dict[str, Any]], given: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Return ``messages`` with this template's preamble first.

        The conversation's leading system (or developer) messages are added to the end of the template's system
        message: the operator's prompt comes first and a caller can add to it, never replace it; and the result
        has one system message, first, as every chat template accepts (Llama 3, Mistral or Gemma refuse a
        system message after the first turn).
        """
        preamble = self.preamble(given)
        lead = 0
        while lead < len(messages) and messages[lead].get("role") in ("system", "developer"):
            lead += 1
        if lead:
            added = "\n\n".join(str(m.get("content") or "") for m in messages[:lead])
            preamble[0] = {"role": "system", "content": f"{preamble[0]['content'].rstrip()}\n\n{added}"}
        return [*preamble, *messages[lead:]]

    # -- identity and storage -----------------------------------------------------------------------------------

    def chat_template(self) -> list[dict[str, str]]:
        """Return the template as MLflow stores a chat prompt (placeholders as written)."""
        out = [{"role": "system", "content": self.system}]
        for user, assistant in self.examples:
            out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "system": self.system, "examples": [list(p) for p in self.examples],
                "variables": dict(sorted(self.variables.items())), "description": self.description}

    def digest(self) -> str:
        """Return the SHA-256 of what decides the rendered messages (texts and default values, not the description)."""
        body = {"template": self.chat_template(), "variables": dict(sorted(self.variables.items()))}
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def render_text(self) -> str:
        """Return the template as readable text (for ``nightshift prompts diff`` and reports)."""
        lines = [f"# {self.name}", "", "[system]", *self.system.splitlines()]
        for i, (user, assistant) in enumerate(self.examples, start=1):
            lines += ["", f"[example {i}: user]", *user.splitlines(), f"[example {i}: assistant]",
                      *assistant.splitlines()]
        if self.variables:
            lines += ["", "[variables]", *(f"{k} = {v}" for k, v in sorted(self.variables.items()))]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_chat_template(cls, name: str, template: Any, variables: dict[str, str],
                           description: str = "") -> PromptTemplate:
        """Return the template MLflow stored as a chat prompt; PromptError when it is not one nightshift wrote."""
        if not isinstance(template, list) or not template or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in template):
            raise PromptError(f"prompt {name}: the registry's version is not a chat template of messages")
        roles = [m.get("role") for m in template]
        if roles[0] != "system" or len(roles) % 2 != 1 or roles[1:] != [ROLES[i % 2] for i in range(len(roles) - 1)]:
            raise PromptError(f"prompt {name}: the registry's version must be a system message followed by "
                              "user/assistant example pairs")
        examples = tuple((template[i]["content"], template[i + 1]["content"]) for i in range(1, len(template), 2))
        return cls(name, template[0]["content"], examples, dict(variables), description)


def load_template(path: Path) -> PromptTemplate:
    """Return the template of one YAML file (``name``, ``system``, optional ``examples``, ``variables`` and
    ``description``); errors name the file and the field."""
    path = Path(path)
    where = path.name
    try:
        data = read_yaml_mapping(path)
    except UnicodeDecodeError:
        raise PromptError(f"{where}: not UTF-8 text") from None
    except ValueError as exc:
        raise PromptError(str(exc)) from None
    unknown = sorted(str(k) for k in set(data) - {"name", "system", "examples", "variables", "description"})
    if unknown:
        raise PromptError(f"{where}: unknown fields {unknown}")
    name = data.get("name", path.stem)
    examples = data.get("examples") or []
    if not isinstance(examples, list):
        raise PromptError(f"{where}: examples must be a list of {{user, assistant}} mappings")
    pairs = []
    for i, example in enumerate(examples, start=1):
        if not isinstance(example, dict) or set(example) != {"user", "assistant"}:
            raise PromptError(f"{where}: examples[{i}] must be a mapping with exactly user and assistant")
        pairs.append((example["user"], example["assistant"]))
    variables = data.get("variables") or {}
    if not isinstance(variables, dict):
        raise PromptError(f"{where}: variables must be a mapping of names to default values")
    variables = {str(k): (v if not isinstance(v, (int, float)) or isinstance(v, bool) else str(v))
                 for k, v in variables.items()}
    try:
        return PromptTemplate(name if isinstance(name, str) else "", data.get("system"), tuple(pairs), variables,
                              data.get("description") or "")
    except PromptError as exc:
        raise PromptError(f"{where}: {exc}") from None


def source_templates(folder: Path) -> dict[str, PromptTemplate]:
    """Return every template of a folder of YAML files by name; two files with one name are refused."""
    out: dict[str, PromptTemplate] = {}
    for path in sorted(Path(folder).glob("*.yaml")):
        template = load_template(path)
        if template.name in out:
            raise PromptError(f"{path.name}: a second template named {template.name}")
        out[template.name] = template
    return out
