"""The judge of pass rate and win rate: an OpenAI-compatible vision LLM, or the toy world's judge, behind one
interface (``base.Judge``).

``base`` (the interface and items), ``openai_api`` (the chat-completions backend), ``templates`` and ``prompts/``
(the prompt files), ``schema`` (reply validation), ``cache`` (response cache), ``runner`` (folders -> records and
summaries, both orders), ``cli`` (``python -m evaluation.judge``), ``fake_server`` (a local server for tests)."""
