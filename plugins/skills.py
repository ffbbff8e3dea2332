"""Built-in skills: Agent Skills folders (``SKILL.md`` with YAML front matter), disclosed progressively.

The system prompt lists only each skill's name and description; the maker reads a skill's
instructions with ``load_skill`` and the files it bundles with ``read_skill_file``. Skills live
outside the sandbox, so these tools run on the host, and they read nothing outside the skill's
own folder: no ``..``, no absolute paths, and no symlink that leads out (checked on the file
actually opened, so a link swapped in meanwhile is caught too).

Skills are found through ``loopwright_register_skill_sources``; this plugin registers the loop's
``agent.skills`` folders and the repository's ``.claude/skills/``, last, so a plugin package's
skills come first. The first skill of a name wins; a malformed or clashing skill is skipped and
reported in the run's trace as a ``skill_skipped`` event, and the run goes on.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from loopwright.runtime.hookspecs import hookimpl
from loopwright.runtime.types import Tool, ToolContext, ToolResult

log = logging.getLogger(__name__)

SKILL_FILE = "SKILL.md"
MAX_NAME = 64
MAX_DESCRIPTION = 1024  # the Agent Skills limit; a longer one is cut in the index
MAX_FILE_BYTES = 512 * 1024
MAX_LISTED_FILES = 200
PROMPT_HEADER = """# Skills
Skills are folders of instructions and files for particular kinds of task. Only their names and \
descriptions are listed here. When your task matches a skill's description, call `load_skill` with \
its name and follow its instructions; read a file it bundles with `read_skill_file`."""


class SkillError(Exception):
    """A skill that cannot be used, or a path a skill tool refuses; the message says why."""


@dataclass
class Skill:
    name: str
    description: str
    root: Path  # the real path of the skill's folder: every read stays inside it
    source: str


@dataclass
class SkippedSkill:
    skill: str  # its name when the front matter gave one, else its folder's name
    folder: str
    source: str
    problem: str


# --- SKILL.md -----------------------------------------------------------------------------------


def parse_skill_md(text: str) -> tuple[dict[str, Any], str]:
    """The front matter (a YAML mapping between ``---`` lines at the top) and the markdown body."""
    import yaml  # here, not at start-up

    lines = text.lstrip("\ufeff").splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        raise SkillError("SKILL.md does not start with YAML front matter (a '---' line)")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise SkillError("the front matter of SKILL.md has no closing '---' line")
    try:
        meta = yaml.safe_load("".join(lines[1:end]))
    except yaml.YAMLError as error:
        raise SkillError(f"the front matter of SKILL.md is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(meta, dict):
        raise SkillError("the front matter of SKILL.md is not a mapping of fields")
    for field in ("name", "description"):
        value = meta.get(field)
        if not isinstance(value, str) or not value.strip():
            raise SkillError(f"the front matter of SKILL.md lacks '{field}' (a non-empty string)")
    name = meta["name"].strip()
    if len(name) > MAX_NAME or "\n" in name or "/" in name:
        raise SkillError(f"the skill name {name!r} is not one line of at most {MAX_NAME} characters without '/'")
    return meta, "".join(lines[end + 1:]).lstrip("\n")


def read_inside(root: Path, relative: str, limit: int = MAX_FILE_BYTES) -> bytes:
    """Read a file under ``root`` (a real path), refusing any path or symlink that leads outside it."""
    if not isinstance(relative, str) or not relative.strip() or "\x00" in relative:
        raise SkillError("the path must be a non-empty string, relative to the skill's folder")
    parts = PurePosixPath(relative).parts
    if PurePosixPath(relative).is_absolute() or ".." in parts:
        raise SkillError(f"path {relative!r} leaves the skill's folder; give a path inside it, without '..'")
    real = Path(os.path.realpath(root.joinpath(*parts)))
    if not real.is_relative_to(root):
        raise SkillError(f"path {relative!r} leads outside the skill's folder through a symlink; refusing to follow it")
    if real.is_dir():
        raise SkillError(f"{relative!r} is a folder; load_skill lists the skill's files")
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SkillError(f"no file {relative!r} in the skill's folder") from None
    except OSError as error:
        raise SkillError(f"cannot open {relative!r}: {error.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        opened = _opened_path(fd)
        if opened is not None and not opened.is_relative_to(root):  # a link swapped in after the check
            raise SkillError(f"path {relative!r} leads outside the skill's folder; refusing to read it")
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SkillError(f"{relative!r} is not a regular file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise SkillError(f"{relative!r} is larger than {limit // 1024} KiB; too large to read as a skill file")
    return data


def _opened_path(fd: int) -> Path | None:
    try:
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:  # no /proc (not Linux): the realpath check above stands alone
        return None


def bundled_files(root: Path) -> list[str]:
    """The skill's files other than SKILL.md, relative to its folder (symlinked folders not followed)."""
    found: list[str] = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != ".git")
        for name in sorted(files):
            path = Path(here, name).relative_to(root).as_posix()
            if path != SKILL_FILE:
                found.append(path)
    return found


def load_skill_file(root: Path, source: str) -> Skill:
    text = read_inside(root, SKILL_FILE).decode("utf-8", errors="replace")
    meta, _body = parse_skill_md(text)
    return Skill(meta["name"].strip(), " ".join(meta["description"].split()), root, source)


# --- finding skills -----------------------------------------------------------------------------


def _skill_folders(folder: Path) -> tuple[list[Path], str | None]:
    """The skill folders a source's folder stands for: itself, or its subfolders holding a SKILL.md."""
    if not folder.is_dir():
        return [], f"the skills folder {folder} does not exist"
    if os.path.lexists(folder / SKILL_FILE):
        return [Path(os.path.realpath(folder))], None
    container = Path(os.path.realpath(folder))
    found = []
    for child in sorted(folder.iterdir()):
        if child.is_dir() and os.path.lexists(child / SKILL_FILE):
            real = Path(os.path.realpath(child))
            if not real.is_relative_to(container):
                return found, f"{child} is a symlink to a folder outside {folder}; list that folder itself"
            found.append(real)
    if not found:
        return [], f"no {SKILL_FILE} in {folder} or in its subfolders"
    return found, None


def find_skills(host: Any, spec: Any, worktree: Path) -> tuple[list[Skill], list[SkippedSkill]]:
    """Every usable skill for a run, in source order (first of a name wins), and what was skipped."""
    skills: dict[str, Skill] = {}
    skipped: list[SkippedSkill] = []
    for source in host.skill_sources():
        try:
            folders = [Path(folder) for folder in source.value(spec, worktree) or []]
        except Exception as error:  # a broken source loses its skills, not the run
            skipped.append(SkippedSkill(source.name, "", source.name, f"the skill source failed: {error}"))
            continue
        for folder in folders:
            try:
                roots, problem = _skill_folders(folder)
            except OSError as error:  # e.g. a folder the process may not list
                roots, problem = [], f"cannot read {folder}: {error.strerror or error}"
            if problem:
                skipped.append(SkippedSkill(folder.name, str(folder), source.name, problem))
            for root in roots:
                try:
                    skill = load_skill_file(root, source.name)
                except SkillError as error:
                    skipped.append(SkippedSkill(_name_hint(root), str(root), source.name, str(error)))
                    continue
                first = skills.get(skill.name)
                if first is not None:
                    skipped.append(SkippedSkill(skill.name, str(root), source.name,
                                                f"a skill of the same name from {first.source} ({first.root}) is used"))
                    continue
                skills[skill.name] = skill
    return list(skills.values()), skipped


def _name_hint(root: Path) -> str:
    """A malformed skill's name as far as it can be read, for the report; else its folder's name."""
    import yaml

    try:
        text = read_inside(root, SKILL_FILE).decode("utf-8", errors="replace")
        meta = yaml.safe_load(text.split("---")[1])
        if isinstance(meta, dict) and isinstance(meta.get("name"), str) and meta["name"].strip():
            return meta["name"].strip()
    except Exception:
        pass
    return root.name


def index(skills: list[Skill]) -> str:
    lines = [PROMPT_HEADER, ""]
    for skill in skills:
        description = skill.description
        if len(description) > MAX_DESCRIPTION:
            description = description[: MAX_DESCRIPTION - 3] + "..."
        lines.append(f"- {skill.name}: {description}")
    return "\n".join(lines)


# --- the tools ----------------------------------------------------------------------------------


def _skill_tools(skills: list[Skill]) -> list[Tool]:
    by_name = {skill.name: skill for skill in skills}

    def lookup(name: Any) -> Skill:
        if name not in by_name:
            raise SkillError(f"no skill named {name!r}; the skills are: {', '.join(sorted(by_name))}")
        return by_name[name]

    def load_skill(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        try:
            skill = lookup(args.get("name"))
            _meta, body = parse_skill_md(read_inside(skill.root, SKILL_FILE).decode("utf-8", errors="replace"))
        except SkillError as error:
            return ToolResult(str(error), is_error=True)
        files = bundled_files(skill.root)
        listing = "\n".join(f"- {path}" for path in files[:MAX_LISTED_FILES])
        if len(files) > MAX_LISTED_FILES:
            listing += f"\n- ... and {len(files) - MAX_LISTED_FILES} more"
        text = f"# Skill: {skill.name}\n\n{body.rstrip()}\n"
        if files:
            text += f"\n---\nFiles bundled with this skill (read one with read_skill_file):\n{listing}\n"
        return ToolResult(text, details={"skill": skill.name, "source": skill.source})

    def read_skill_file(ctx: ToolContext, args: dict[str, Any]) -> ToolResult:
        try:
            skill = lookup(args.get("name"))
            data = read_inside(skill.root, args.get("path"))
        except SkillError as error:
            return ToolResult(str(error), is_error=True)
        if b"\x00" in data[:8192]:
            return ToolResult(f"{args['path']!r} is a binary file ({len(data)} bytes); it cannot be shown as text", True)
        return ToolResult(data.decode("utf-8", errors="replace"), details={"skill": skill.name})

    name_schema = {"type": "string", "description": "the skill's name, as listed under # Skills"}
    return [
        Tool(
            "load_skill",
            "Load a skill's instructions (the body of its SKILL.md) and the list of files it bundles. "
            "Call it when your task matches the skill's description.",
            {"type": "object", "properties": {"name": name_schema}, "required": ["name"]},
            load_skill,
        ),
        Tool(
            "read_skill_file",
            "Read a text file bundled with a skill, by its path relative to the skill's folder "
            "(as listed by load_skill, e.g. 'reference/guide.md').",
            {"type": "object", "properties": {"name": name_schema, "path": {"type": "string"}}, "required": ["name", "path"]},
            read_skill_file,
        ),
    ]


# --- hooks --------------------------------------------------------------------------------------


def loop_skills(spec: Any, worktree: Path) -> list[Path]:
    """The loop's `agent.skills`: paths from a spec file are already absolute; others are in the repo."""
    folders = []
    for folder in map(Path, spec.agent.skills):
        if not folder.is_absolute():  # an inline spec (over MCP) names folders of the repository
            folder = worktree / folder
            if not Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(worktree)):
                raise SkillError(f"agent.skills: {folder} leads outside the repository; name a folder inside it")
        folders.append(folder)
    return folders


def repo_skills(spec: Any, worktree: Path) -> list[Path]:
    """The repository's `.claude/skills/`, as checked out in the run's worktree (Claude Code's place)."""
    folder = worktree / ".claude" / "skills"
    if not folder.is_dir():
        return []
    if not Path(os.path.realpath(folder)).is_relative_to(os.path.realpath(worktree)):
        raise SkillError(".claude/skills is a symlink that leads outside the repository; it is ignored")
    return [folder]


@hookimpl(trylast=True)
def loopwright_register_skill_sources(register):
    register("loop", loop_skills)
    register("repo", repo_skills)


@hookimpl
def loopwright_system_prompt(run, host):
    skills, skipped = find_skills(host, run.spec, run.worktree)
    # Traced here because this hook runs once per run, inside a recorded step.
    for number, skip in enumerate(skipped, 1):
        log.warning("skill %s skipped (%s): %s", skip.skill, skip.folder or skip.source, skip.problem)
        host.store.add_event(run.id, f"0.skill_skipped.{number}", "skill_skipped", 0, vars(skip))
    if skills:
        host.store.add_event(run.id, "0.skills", "skills", 0, {
            "skills": [{"name": s.name, "source": s.source, "folder": str(s.root)} for s in skills]
        })
    return index(skills) if skills else None


@hookimpl
def loopwright_run_tools(run, host):
    skills, _skipped = find_skills(host, run.spec, run.worktree)
    return _skill_tools(skills) if skills else None
