"""Prompts put to a model as a person puts them: bare, as a QA instruction, or through its chat template.

An edit is judged teacher-forced on the bare prompt, but a person asks a question, often
through the model's chat template, and reads a free answer. These helpers turn a prompt
into each of those input forms, and the chat form also into a template for editing (the
subject's ``{}`` kept, so its last token can still be found). No model name is consulted:
whatever chat template the tokenizer carries is used, and a tokenizer without one is an
error naming the model.
"""

from __future__ import annotations

FORMS = ("question", "qa_instruction", "chat")
"""The input forms: the prompt as it is, inside `QA_INSTRUCTION`, or the user turn of a chat."""

QA_INSTRUCTION = "Please answer the question:\n\nQ: {}\nA:"
"""The QA instruction form; ``{}`` is the question."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer) -> None:
    """Raises the error that names the model when its tokenizer has no chat template."""
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", "") or "this model"
        raise ValueError(
            f"{name} has no chat template (its tokenizer's chat_template is empty): the 'chat' input form "
            "and editing through the chat template need an instruct/chat model; use the 'question' or "
            "'qa_instruction' form instead"
        )


def _without_added_bos(tokenizer, text: str) -> str:
    """The rendered text less a leading BOS that the tokenizer adds again when it encodes the text,
    so the text can be tokenized like any other prompt without a doubled BOS."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos):
        probe = tokenizer("a")["input_ids"]
        if probe and probe[0] == tokenizer.bos_token_id:
            return text[len(bos):]
    return text


def chat_text(tokenizer, user: str) -> str:
    """``user`` as the user turn of the model's chat template, up to where the assistant's answer begins."""
    require_chat_template(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    return _without_added_bos(tokenizer, rendered)


def chat_template(tokenizer, template: str) -> str:
    """A prompt template (one ``{}``, maybe after a context prefix) rendered as the user turn, the
    ``{}`` kept: editing through the chat template computes keys and values in this context."""
    marker = "\x00PROMPT\x00"  # survives the template engine untouched, unlike a bare "{}"
    rendered = chat_text(tokenizer, template.replace("{}", marker))
    if rendered.count(marker) != 1 or "{}" in rendered.replace(marker, ""):
        raise ValueError(f"the chat template does not keep the prompt {template!r} in one piece")
    return rendered.replace(marker, "{}")


def chat_answer_ids(tokenizer, answer: str) -> list[int]:
    """Token ids of ``answer`` as the assistant's whole turn: the answer (no leading space) and the
    token that ends the turn, read from the template itself (``<|im_end|>``, ``<|eot_id|>``, ...).

    Ending on that token is what makes a chat answer stop after the new target."""
    require_chat_template(tokenizer)
    probe = "\x00"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "?"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    after = rendered[rendered.rindex(probe) + len(probe):]
    end = tokenizer(after, add_special_tokens=False)["input_ids"] if after else []
    special = set(tokenizer.all_special_ids)
    stop = next((i for i in end if i in special), end[0] if end else tokenizer.eos_token_id)
    ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {answer!r} tokenizes to nothing")
    return list(ids) + [stop]


def render_template(tokenizer, form: str, template: str) -> str:
    """A prompt template (its ``{}`` kept) in input form ``form``: what editing in that form computes
    keys and values on."""
    if form == "chat":
        return chat_template(tokenizer, template)
    return render(tokenizer, form, template)


def render(tokenizer, form: str, prompt: str) -> str:
    """``prompt`` in input form ``form`` (one of `FORMS`), as text to generate from."""
    if form == "question":
        return prompt
    if form == "qa_instruction":
        return QA_INSTRUCTION.format(prompt)
    if form == "chat":
        return chat_text(tokenizer, prompt)
    raise ValueError(f"unknown input form {form!r}; choose from {FORMS}")
