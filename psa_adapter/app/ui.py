"""The Gradio page around an ``Engine``: a user (profile form or level preset) and a prompt in; the base and PSA
images side by side, a strip of the prompt at every level, and the toy judge's reading under each image.

The button's endpoint is ``/generate`` (``gradio_client``: ``client.predict(..., api_name="/generate")``); its inputs
are, in order, ``INPUT_NAMES``; its outputs: the message, the base and PSA images, their judge readings, one image per
level, and the level table (markdown). Errors come back as the page's message (``#message``), never as a traceback.
"""

from __future__ import annotations

import sys
import traceback

from psa_adapter.app.engine import AppError, Engine, Request, describe, form_profile, policy_reasons

INPUT_NAMES = ("user", "level", "age", "gender", "religion", "physical_condition", "mental_condition", "banned",
               "prompt", "seed", "psa_scale")
USER_CHOICES = [("the profile form", "profile"), ("a level preset", "level")]
CSS = """
#message {min-height: 1.5em}
#message.error, .error-text {color: #b00020; font-weight: 600}
.reading {font-family: monospace}
"""


def _shown(path: str) -> str:
    """A path inside the checkout relative to it (shorter on the page), anything else as given."""
    from pathlib import Path

    from psa_adapter.app.engine import REPO

    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except ValueError:
        return path


def _policy_text(profile) -> str:
    reasons = policy_reasons(profile)
    if not reasons:
        return "The rules policy bans nothing for this profile."
    lines = [f"- **{cat}**: {'; '.join(why)}" for cat, why in sorted(reasons.items())]
    return "The rules policy bans:\n" + "\n".join(lines)


def _level_text(engine: Engine, name: str) -> str:
    profile = engine.levels.get(name)
    return f"**{name}**: {describe(profile)}" if profile is not None else ""


def _strip_table(engine: Engine, result) -> str:
    rows = ["| level | bans | judge reading |", "|---|---|---|"]
    for name, pic in zip(engine.levels, result.strip):
        rows.append(f"| {name} | {', '.join(engine.levels[name].banned) or 'nothing'} | {pic.reading or '-'} |")
    return "\n".join(rows)


def build_page(engine: Engine):
    """The ``gr.Blocks`` page; call ``.queue()`` and ``.launch()`` on it (``serve`` does)."""
    import gradio as gr

    from psa_adapter.users import CATEGORIES, GENDERS, MENTAL_CONDITIONS, PHYSICAL_CONDITIONS, RELIGIONS

    settings = engine.settings
    first = form_profile(30, "female", "None", "healthy", "healthy")
    levels = list(engine.levels)

    def on_profile(age, gender, religion, physical, mental):
        try:
            profile = form_profile(age, gender, religion, physical, mental)
        except AppError as err:
            return gr.update(), f"<span class='error-text'>{err}</span>"
        return gr.update(value=list(profile.banned)), _policy_text(profile)

    def on_generate(user, level, age, gender, religion, physical, mental, banned, prompt, seed, psa_scale):
        request = Request(prompt=prompt, seed=seed, psa_scale=psa_scale, user=user, level=level, age=age,
                          gender=gender, religion=religion, physical_condition=physical, mental_condition=mental,
                          banned=list(banned or []))
        empty = (None, None, "", "", *[None] * len(levels), "")
        try:
            result = engine.run(request)
        except AppError as err:
            return (f"<span class='error-text'>Error: {err}</span>", *empty)
        except Exception as err:  # noqa: BLE001 - the page shows one line; the terminal gets the traceback
            traceback.print_exc(file=sys.stderr)
            return (f"<span class='error-text'>Error: {type(err).__name__}: {err}</span>", *empty)
        message = (f"For {result.user_text}. Seed {result.settings['seed']}, PSA scale "
                   f"{result.settings['psa_scale']:g}, {result.settings['steps']} steps, guidance "
                   f"{result.settings['guidance']:g}; {result.seconds:.1f} s.")
        return (message, result.base.image, result.psa.image, result.base.reading or "",
                result.psa.reading or "", *[pic.image for pic in result.strip], _strip_table(engine, result))

    with gr.Blocks(title="PSA: personalised safety, side by side") as page:
        gr.Markdown(
            "# Personalised safety alignment: base model vs PSA\n"
            f"Model `{_shown(settings.sd_model)}`, adapter `{_shown(settings.psa_path)}`. Describe a user (or pick "
            "a strictness level), type a prompt, and compare what the base model draws with what the personalised "
            "model draws for that user, from the same seed."
        )
        with gr.Row():
            with gr.Column(scale=1):
                user = gr.Radio(USER_CHOICES, value="profile", label="User from", elem_id="user_source")
                with gr.Group():
                    age = gr.Number(value=30, label="Age", precision=0, elem_id="age")
                    gender = gr.Dropdown(list(GENDERS), value=first.gender, label="Gender", elem_id="gender")
                    religion = gr.Dropdown(list(RELIGIONS), value=first.religion, label="Religion",
                                           elem_id="religion")
                    physical = gr.Dropdown(list(PHYSICAL_CONDITIONS), value=first.physical_condition,
                                           label="Physical condition", elem_id="physical")
                    mental = gr.Dropdown(list(MENTAL_CONDITIONS), value=first.mental_condition,
                                         label="Mental condition", elem_id="mental")
                    banned = gr.CheckboxGroup(list(CATEGORIES), value=list(first.banned),
                                              label="Banned categories (filled by the rules policy; tick to override)",
                                              elem_id="banned")
                    policy = gr.Markdown(_policy_text(first), elem_id="policy")
                level = gr.Dropdown(levels, value=settings.level, label="Level preset (L0 bans nothing, "
                                    f"{levels[-1]} bans every category)", elem_id="level")
                level_info = gr.Markdown(_level_text(engine, settings.level), elem_id="level_info")
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", lines=1, elem_id="prompt",
                                    placeholder=engine.captions[0] if engine.captions else "a street at night")
                if engine.captions:
                    gr.Examples([[c] for c in engine.captions], inputs=[prompt], label="Toy-world captions")
                with gr.Row():
                    seed = gr.Number(value=0, label="Seed", precision=0, elem_id="seed")
                    scale = gr.Slider(0.0, 2.0, value=settings.psa_scale, step=0.1, label="PSA scale",
                                      elem_id="psa_scale")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                message = gr.Markdown("", elem_id="message")
                with gr.Row():
                    with gr.Column():
                        base_image = gr.Image(label="base model", type="pil", format="png", interactive=False,
                                              elem_id="base_image")
                        base_reading = gr.Textbox(label="base: toy judge", interactive=False,
                                                  elem_id="base_reading", elem_classes=["reading"],
                                                  visible=engine.judge is not None)
                    with gr.Column():
                        psa_image = gr.Image(label="PSA for this user", type="pil", format="png",
                                             interactive=False, elem_id="psa_image")
                        psa_reading = gr.Textbox(label="PSA: toy judge", interactive=False, elem_id="psa_reading",
                                                 elem_classes=["reading"], visible=engine.judge is not None)
                gr.Markdown("**The same prompt and seed at every level** (PSA; the table gives each level's "
                            "banned categories and the judge's reading)")
                with gr.Row(elem_id="strip"):
                    strip = [gr.Image(label=name, type="pil", format="png", interactive=False, height=160,
                                      min_width=90, elem_id=f"strip_{name}", buttons=[]) for name in levels]
                strip_table = gr.Markdown("", elem_id="strip_table")

        profile_inputs = [age, gender, religion, physical, mental]
        for component in profile_inputs:
            component.change(on_profile, profile_inputs, [banned, policy], queue=False, api_visibility="private")
        level.change(lambda name: _level_text(engine, name), [level], [level_info], queue=False,
                     api_visibility="private")
        inputs = [user, level, age, gender, religion, physical, mental, banned, prompt, seed, scale]
        outputs = [message, base_image, psa_image, base_reading, psa_reading, *strip, strip_table]
        button.click(on_generate, inputs, outputs, api_name="generate")
        prompt.submit(on_generate, inputs, outputs, api_visibility="private")
    return page


__all__ = ["CSS", "INPUT_NAMES", "build_page"]
