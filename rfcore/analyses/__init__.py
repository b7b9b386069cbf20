"""Registered analyses: every module here defines one `rfcore.analysis.Analysis` with `@register`;
`rfcore.analysis.list_analyses()` imports them all."""
