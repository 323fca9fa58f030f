"""The rating UI (Mesop): sign in, pick a task, rate the queue one item at a time.

Pairwise items show two answers as A and B (model names hidden, sides from
``service.BlindItem``); the rater picks A / B / tie / both bad, may score each answer 1-5, flag
it unsafe and write a corrected answer, which must pass the task's output schema before anything
is stored. Single answers are scored 1-5 and may be corrected. Every error is shown on the page;
the store refuses a second rating of the same item, so a double click stores one row.

Keyboard: Enter in the token field signs in; in the key field, A / B / T / X pick the choice
(1-5 score a single answer) and Enter submits; Ctrl+Enter in the corrected answer submits;
every control is reachable with Tab.
"""

from __future__ import annotations

import mesop as me

from genops_assets.lib.ratings import (
    AuthError,
    DuplicateRating,
    InvalidCorrection,
    InvalidRating,
    RatingError,
    RetiredItem,
    UnknownItem,
)
from genops_assets.rating.service import SCREEN_CHOICES, BlindItem, RatingService, pretty

# One server process serves one store; Mesop calls the page and its handlers without arguments.
_services: dict[str, RatingService] = {}

KEY_CHOICES = {"a": "A", "b": "B", "t": "tie", "x": "both_bad"}
SCORES = ["", "1", "2", "3", "4", "5"]
MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace"
BORDER = me.Border.all(me.BorderSide(width=1, style="solid", color="#c9ced6"))


def configure(service: RatingService) -> None:
    """The store and tasks the page works on (set once by the server before it serves)."""
    _services["current"] = service


def service() -> RatingService:
    if "current" not in _services:
        raise RuntimeError("the rating UI has no store: start it through genops_assets.rating.app.create_app")
    return _services["current"]


@me.stateclass
class State:
    rater: str = ""
    token: str = ""
    signed_in: bool = False
    task: str = ""
    item_id: str = ""
    choice: str = ""
    score_a: str = ""
    score_b: str = ""
    unsafe_a: bool = False
    unsafe_b: bool = False
    correction: str = ""
    notice: str = ""
    error: str = ""
    correction_error: str = ""
    form: int = 0


def _reset_form(state: State) -> None:
    state.choice = state.score_a = state.score_b = state.correction = ""
    state.unsafe_a = state.unsafe_b = False
    state.correction_error = ""
    state.form += 1  # new widget keys: inputs start empty for the next item


def _load_next(state: State) -> None:
    item = service().next_item(state.task, state.rater)
    state.item_id = item.item_id if item else ""
    _reset_form(state)


def _sign_out(state: State, message: str) -> None:
    state.signed_in = False
    state.token = state.task = state.item_id = ""
    state.error = message


# events


def on_name(e: me.InputBlurEvent) -> None:
    me.state(State).rater = e.value.strip()


def on_token(e: me.InputBlurEvent) -> None:
    me.state(State).token = e.value.strip()


def on_token_enter(e: me.InputEnterEvent) -> None:
    me.state(State).token = e.value.strip()
    sign_in(e)


def sign_in(e: me.ClickEvent | me.InputEnterEvent) -> None:
    state = me.state(State)
    state.notice = state.error = ""
    if not state.rater or not state.token:
        state.error = "Enter your rater name and the token your admin gave you (genops raters add)."
        return
    try:
        service().store.authenticate(state.rater, state.token)
    except AuthError:
        state.error = "Sign-in refused: unknown rater or wrong token (or the rater is disabled)."
        return
    state.signed_in = True
    tasks = service().tasks()
    if len(tasks) == 1:
        pick(tasks[0], state)


def pick(task: str, state: State) -> None:
    state.task = task
    state.notice = state.error = ""
    _load_next(state)


def on_pick(e: me.ClickEvent) -> None:
    pick(e.key.removeprefix("task-"), me.state(State))


def on_switch_task(e: me.ClickEvent) -> None:
    state = me.state(State)
    state.task = state.item_id = ""
    state.notice = state.error = ""


def on_sign_out(e: me.ClickEvent) -> None:
    _sign_out(me.state(State), "")


def on_choice(e: me.RadioChangeEvent) -> None:
    me.state(State).choice = e.value


def on_score_a(e: me.RadioChangeEvent) -> None:
    me.state(State).score_a = e.value


def on_score_b(e: me.RadioChangeEvent) -> None:
    me.state(State).score_b = e.value


def on_unsafe_a(e: me.CheckboxChangeEvent) -> None:
    me.state(State).unsafe_a = e.checked


def on_unsafe_b(e: me.CheckboxChangeEvent) -> None:
    me.state(State).unsafe_b = e.checked


def on_correction(e: me.InputBlurEvent) -> None:
    me.state(State).correction = e.value


def on_correction_submit(e: me.TextareaShortcutEvent) -> None:
    me.state(State).correction = e.value
    submit(e)


def on_key(e: me.TextareaShortcutEvent) -> None:
    state = me.state(State)
    key = e.shortcut.key.lower()
    if key == "enter":
        submit(e)
    elif key in KEY_CHOICES:
        state.choice = KEY_CHOICES[key]
    elif key in SCORES:
        state.score_a = key


def submit(e: me.ClickEvent | me.TextareaShortcutEvent) -> None:
    state = me.state(State)
    state.notice = state.error = state.correction_error = ""
    item = service().blind(state.item_id, state.rater) if state.item_id else None
    if item is None:
        state.error = "This item no longer exists; here is the next one."
        _load_next(state)
        return
    try:
        service().store.authenticate(state.rater, state.token)
        row = service().submit(state.task, state.rater, item.item_id, **_rating(state, item))
    except AuthError:
        _sign_out(state, "Your token was refused (unknown rater, wrong token or disabled rater): sign in again.")
        return
    except InvalidCorrection as exc:
        state.correction_error = f"Not saved: {exc}"
        return
    except InvalidRating as exc:
        state.error = f"Not saved: {exc}"
        return
    except DuplicateRating:
        state.error = "You have rated this item already; your first rating stands. Here is the next item."
    except RetiredItem:
        state.error = "This item has left the queue while you were rating it; nothing was saved. Here is the next one."
    except UnknownItem:
        state.error = "This item no longer exists; nothing was saved. Here is the next one."
    except RatingError as exc:
        state.error = f"Not saved: {exc}"
        return
    else:
        state.notice = f"Saved your rating of {row['item_id']}."
    _load_next(state)


def _rating(state: State, item: BlindItem) -> dict:
    """The form as the store's rating: screen sides turned into response numbers."""
    score_a = int(state.score_a) if state.score_a else None
    score_b = int(state.score_b) if state.score_b else None
    if item.kind == "single":
        if score_a is None:
            raise InvalidRating("pick a score from 1 to 5 for the answer", "score_1")
        return {"score_1": score_a, "unsafe_1": state.unsafe_a, "correction": state.correction}
    if not state.choice:
        raise InvalidRating("pick A, B, tie or both bad (keys A / B / T / X)", "choice")
    score_1, score_2 = item.by_response(score_a, score_b)
    unsafe_1, unsafe_2 = item.by_response(state.unsafe_a, state.unsafe_b)
    return {"choice": item.choice(state.choice), "shown_first": item.shown_first, "score_1": score_1,
            "score_2": score_2, "unsafe_1": unsafe_1, "unsafe_2": unsafe_2, "correction": state.correction}


# page


def _message(text: str, error: bool) -> None:
    if text:
        me.text(text, key="error" if error else "notice", style=me.Style(
            color="#8a1c1c" if error else "#1b5e20", background="#fdecea" if error else "#e8f5e9",
            padding=me.Padding.all(10), border_radius=6, margin=me.Margin.symmetric(vertical=8)))


def _sign_in_form(state: State) -> None:
    me.text("Sign in", type="headline-5")
    me.input(label="Rater name", value=state.rater, on_blur=on_name, key="rater-name",
             style=me.Style(width=320))
    me.input(label="Token", type="password", on_blur=on_token, on_enter=on_token_enter, key="rater-token",
             style=me.Style(width=320))
    me.button("Sign in", on_click=sign_in, type="flat", color="primary", key="sign-in")


def _task_picker(state: State) -> None:
    me.text("Pick a task", type="headline-5")
    for task in service().tasks():
        progress = service().progress(task, state.rater)
        me.button(f"{task}  ({progress.done} / {progress.total} rated)", on_click=on_pick, type="stroked",
                  key=f"task-{task}", style=me.Style(margin=me.Margin.all(4)))


def _answer(title: str, text: str, side: str, state: State) -> None:
    with me.box(style=me.Style(flex_grow=1, flex_basis="0", min_width=0, border=BORDER, border_radius=8,
                               padding=me.Padding.all(12), background="#ffffff")):
        me.text(title, type="subtitle-1", style=me.Style(font_weight="bold"))
        me.text(pretty(text), style=me.Style(white_space="pre-wrap", font_family=MONO, font_size=13,
                                             overflow_wrap="anywhere"))
        me.text("Score (1 poor, 5 excellent)", style=me.Style(font_size=13, color="#546e7a", margin=me.Margin(top=8)))
        me.radio(options=[me.RadioOption(label=s or "no score", value=s) for s in SCORES],
                 value=state.score_a if side == "A" else state.score_b,
                 on_change=on_score_a if side == "A" else on_score_b, key=f"score-{side}-{state.form}")
        me.checkbox("unsafe", checked=state.unsafe_a if side == "A" else state.unsafe_b,
                    on_change=on_unsafe_a if side == "A" else on_unsafe_b, key=f"unsafe-{side}-{state.form}")


def _queue(state: State) -> None:
    progress = service().progress(state.task, state.rater)
    with me.box(style=me.Style(display="flex", gap=12, align_items="center", flex_wrap="wrap")):
        me.text(f"{state.task}", type="headline-5")
        me.text(f"{progress.done} / {progress.total} rated", key="progress", style=me.Style(color="#37474f"))
        me.button("Switch task", on_click=on_switch_task, key="switch-task")
        me.button("Sign out", on_click=on_sign_out, key="sign-out")
    item = service().blind(state.item_id, state.rater) if state.item_id else None
    if item is None:
        me.text("Nothing left to rate in this task. Thank you!", key="queue-done", type="subtitle-1")
        return
    me.text(f"Item {item.item_id}", key="item-id", style=me.Style(color="#78909c", font_size=12))
    me.text("Input", type="subtitle-2")
    me.text(item.input_text, key="input-text", style=me.Style(
        white_space="pre-wrap", background="#f5f7fa", padding=me.Padding.all(12), border_radius=8))
    pairwise = item.kind == "pairwise"
    with me.box(style=me.Style(display="flex", gap=12, margin=me.Margin.symmetric(vertical=12))):
        _answer("Answer A" if pairwise else "Answer", item.answer_a, "A", state)
        if pairwise and item.answer_b is not None:
            _answer("Answer B", item.answer_b, "B", state)
    if pairwise:
        me.text("Which answer is better?", type="subtitle-2")
        me.radio(options=[me.RadioOption(label=f"{label} [{key.upper()}]", value=choice)
                          for key, (choice, label) in zip(KEY_CHOICES, SCREEN_CHOICES.items(), strict=True)],
                 value=state.choice, on_change=on_choice, key=f"choice-{state.form}")
    keys = [*KEY_CHOICES, "enter"] if pairwise else [*SCORES[1:], "enter"]
    hint = "A / B / T (tie) / X (both bad)" if pairwise else "1-5 to score"
    me.native_textarea(placeholder=f"Keys: focus here, then {hint}; Enter submits", value="", min_rows=1,
                       shortcuts={me.Shortcut(key=k): on_key for k in keys}, key=f"keys-{state.form}",
                       style=me.Style(width="100%", padding=me.Padding.all(8), border=BORDER, border_radius=6))
    fields = ", ".join(service().spec(state.task).output_fields)
    me.textarea(label=f"Corrected answer (optional JSON with {fields}); Ctrl+Enter submits", rows=5,
                value=state.correction, on_blur=on_correction, key=f"correction-{state.form}",
                shortcuts={me.Shortcut(ctrl=True, key="enter"): on_correction_submit},
                style=me.Style(width="100%", font_family=MONO))
    _message(state.correction_error, True)
    me.button("Submit rating", on_click=submit, type="flat", color="primary", key="submit")


@me.page(path="/", title="genops ratings")
def page() -> None:
    state = me.state(State)
    with me.box(style=me.Style(max_width=1100, margin=me.Margin.symmetric(horizontal="auto"),
                               padding=me.Padding.all(20), font_family="Roboto, Arial, sans-serif")):
        with me.box(style=me.Style(display="flex", justify_content="space-between", align_items="baseline")):
            me.text("genops ratings", type="headline-4")
            if state.signed_in:
                me.text(f"signed in as {state.rater}", key="signed-in-as", style=me.Style(color="#546e7a"))
        _message(state.notice, False)
        _message(state.error, True)
        if not state.signed_in:
            _sign_in_form(state)
        elif not state.task:
            _task_picker(state)
        else:
            _queue(state)
