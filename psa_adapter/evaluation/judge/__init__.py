"""The judge of pass rate and win rate: an OpenAI-compatible vision LLM, or the toy world's judge, behind one
interface (``base.Judge``). See ``base``."""
