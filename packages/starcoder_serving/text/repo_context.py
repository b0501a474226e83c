"""Fit a fill-in-the-middle prompt with repository context into the window, in the family's own format.

The file being completed comes first: the text nearest the cursor is kept, the prefix cut from its start and the
suffix from its end only when the file alone does not fit. The other files get what is left, at most the context
token budget (``context_token_budget``), the nearest ones (the last sent) first: once one does not fit, it and
every file before it are dropped. What was used and dropped is reported (``ContextReport``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from starcoder_serving.text.prompts import ContextReport, FimTokens, RenderedPrompt, RepoFormat

# Tokens kept spare: pieces tokenized apart can take a few more (or fewer) tokens once joined.
_SLACK = 8
# A text is cut to this many characters per token of its allowance before it is tokenized (no BPE token of code
# is longer in practice), so that a huge prefix or file is never tokenized whole only to be trimmed.
_MAX_CHARS_PER_TOKEN = 32


def fit_repo_prompt(
    fim: FimTokens,
    repo: RepoFormat,
    *,
    repo_name: str | None,
    path: str | None,
    files: Sequence[tuple[str, str]],
    prefix: str,
    suffix: str,
    limit: int,
    budget: int,
    tokenize: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> RenderedPrompt:
    """The prompt, at most ``limit`` tokens where possible; the other files take at most ``budget`` tokens."""
    head = repo.head(repo_name)
    head_tokens = len(tokenize(head)) if head else 0
    room = max(0, limit - head_tokens - _SLACK)
    prefix, suffix, prefix_dropped, suffix_dropped = _fit_current(
        fim, repo, repo_name, path, prefix, suffix, room, tokenize, decode
    )
    current = repo.current(fim, repo_name, path, prefix, suffix)
    left = min(budget, room - len(tokenize(current)))
    used: list[tuple[str, str]] = []
    context_tokens = head_tokens
    kept = len(files)
    for index in range(len(files) - 1, -1, -1):
        file_path, content = files[index]
        block = repo.file(repo_name, file_path, content)
        tokens = len(tokenize(block)) if len(block) <= max(0, left) * _MAX_CHARS_PER_TOKEN else left + 1
        if tokens > left:
            break
        used.append((file_path, block))
        left -= tokens
        context_tokens += tokens
        kept = index
    used.reverse()
    text = head + "".join(block for _, block in used) + current
    report = ContextReport(
        files_used=tuple(file_path for file_path, _ in used),
        files_dropped=tuple(file_path for file_path, _ in files[:kept]),
        context_tokens=context_tokens,
        prefix_tokens_dropped=prefix_dropped,
        suffix_tokens_dropped=suffix_dropped,
    )
    return RenderedPrompt(text, context=report)


def _fit_current(
    fim: FimTokens,
    repo: RepoFormat,
    repo_name: str | None,
    path: str | None,
    prefix: str,
    suffix: str,
    room: int,
    tokenize: Callable[[str], list[int]],
    decode: Callable[[list[int]], str],
) -> tuple[str, str, int, int]:
    """The prefix and suffix that fit in ``room`` tokens with the file's markup, and how many tokens each lost."""
    window_chars = max(1, room) * _MAX_CHARS_PER_TOKEN
    whole = repo.current(fim, repo_name, path, prefix, suffix)
    if len(prefix) + len(suffix) <= window_chars and len(tokenize(whole)) <= room:
        return prefix, suffix, 0, 0
    markup = len(tokenize(repo.current(fim, repo_name, path, "", "")))
    prefix_ids = tokenize(prefix[-window_chars:])
    suffix_ids = tokenize(suffix[:window_chars])
    text_room = max(0, room - markup)
    # The suffix keeps at least a quarter of the room (when it has that much), the prefix the rest.
    keep_suffix = min(len(suffix_ids), max(text_room - len(prefix_ids), text_room // 4))
    keep_prefix = min(len(prefix_ids), text_room - keep_suffix)
    new_prefix = decode(prefix_ids[len(prefix_ids) - keep_prefix :]) if keep_prefix else ""
    new_suffix = decode(suffix_ids[:keep_suffix]) if keep_suffix else ""
    # Counted on what was tokenized: a prefix or suffix cut before tokenizing lost more than this says.
    return new_prefix, new_suffix, len(prefix_ids) - keep_prefix, len(suffix_ids) - keep_suffix
