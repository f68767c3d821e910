"""What the five commands share: flags, ``--help``, errors and exit status.

``python -m slkd_jax.main``, ``.evaluate``, ``.report``, ``.table`` and
``.convert_torch`` each give :func:`run` a function that defines their absl
flags on a fresh ``FlagValues`` (so the commands never clash, and a command
called twice in one process starts from its defaults) and the function that
does the work. :func:`run` parses the command line and maps what happens to
the exit status:

* 0: done; ``--help`` (or ``-h``, ``--helpfull``) prints the module's usage
  and its flags;
* 2: a problem the user fixes, printed as one ``error: ...`` line: a bad
  flag or config (absl / ml_collections errors), any
  :class:`slkd_jax.errors.UserError`, and a full disk or quota (``ENOSPC`` /
  ``EDQUOT``), reported with the path and what to do even when the write
  failed in a background thread (orbax saves asynchronously) and secondary
  errors followed;
* 75 (:data:`slkd_jax.preemption.PREEMPTED_EXIT_CODE`): stopped by
  SIGTERM/SIGINT after saving a checkpoint; rerun the command to resume;
* anything else is a bug and keeps its traceback.

:func:`start` is the ``if __name__ == "__main__"`` of each command: absl's
app (logging set up as for any absl program, chatty libraries' INFO records
dropped) around ``main(sys.argv[1:])``.
"""

from __future__ import annotations

import errno
import io
import logging as std_logging
import os
import re
import sys
import threading
from typing import Any, Callable, Sequence

from absl import flags

from slkd_jax import errors

EXIT_OK = 0
EXIT_USER_ERROR = 2

HELP_FLAGS = ("--help", "-help", "-h", "--helpshort", "--helpfull", "-?")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# How libraries that do not raise an OSError (tensorstore, under orbax) word
# a full disk or quota.
_DISK_FULL_TEXT = re.compile(
    r"no space left on device|disk quota exceeded|"
    rf"errno(?: |=|: )?(?:{errno.ENOSPC}|{errno.EDQUOT})\b", re.IGNORECASE)

_ORBAX_TMP = ".orbax-checkpoint-tmp"

DefineFlags = Callable[[flags.FlagValues, Sequence[str]], None]
Body = Callable[[flags.FlagValues, list], "int | None"]


def run(define_flags: DefineFlags, body: Body, argv: Sequence[str] | None,
        *, prog: str, doc: str | None,
        output: Callable[[flags.FlagValues], str | None] = lambda fv: None
        ) -> int:
  """Parse ``argv`` (the arguments after the program name; default
  ``sys.argv[1:]``) and run ``body(flag_values, positional_args)``.

  Args:
    define_flags: ``define_flags(flag_values, argv)`` defines the command's
      flags on ``flag_values`` (``argv`` is for
      ``config_flags.DEFINE_config_file(..., sys_argv=argv)``, whose
      ``--config.key=value`` overrides are read from it).
    body: the work; returns the exit status (``None``: 0).
    argv: the command line after the program name.
    prog: the command, e.g. ``python -m slkd_jax.report``, for ``--help``.
    doc: the usage text ``--help`` prints above the flags.
    output: where the command writes, named in a disk-full message when the
      failed write does not say which file it was.

  Returns:
    The exit status (see the module docstring).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  flag_values = flags.FlagValues()
  define_flags(flag_values, [prog, *argv])
  if any(arg in HELP_FLAGS for arg in argv):
    print_help(flag_values, prog, doc)
    return EXIT_OK
  try:
    positional = flag_values([prog, *_underscored(argv, flag_values)])[1:]
  except Exception as e:  # noqa: BLE001 - all of it is the user's input
    print(f"error: {flag_error_line(e, argv)}", file=sys.stderr)
    return EXIT_USER_ERROR
  return guard(lambda: body(flag_values, positional),
               output=lambda: _output_or_none(output, flag_values))


def _underscored(argv: Sequence[str],
                 flag_values: flags.FlagValues) -> list[str]:
  """``--dry-run`` / ``--no-measure`` / ``--num-classes=3`` read as the
  flags ``dry_run`` / ``nomeasure`` / ``num_classes`` (absl names use
  ``_``; the dashed spelling is what many people type)."""
  names = set(flag_values)
  converted = []
  for arg in argv:
    dashes = len(arg) - len(arg.lstrip("-"))
    name, eq, value = arg[dashes:].partition("=")
    if arg == "--":  # the rest are positional
      converted += argv[len(converted):]
      break
    if dashes and "-" in name and "." not in name and name not in names:
      underscored = name.replace("-", "_")
      if underscored.startswith("no_") and underscored[3:] in names:
        underscored = "no" + underscored[3:]
      if underscored in names or (underscored.startswith("no")
                                  and underscored[2:] in names):
        arg = "-" * dashes + underscored + eq + value
    converted.append(arg)
  return converted


def _output_or_none(output, flag_values) -> str | None:
  try:
    return output(flag_values)
  except Exception:  # noqa: BLE001 - only a hint for the message
    return None


def print_help(flag_values: flags.FlagValues, prog: str,
               doc: str | None) -> None:
  """The usage text and each of the command's flags with its help and
  default, on stdout."""
  text = (doc or "").strip("\n")
  print(text if text else f"usage: {prog} [flags]")
  print(f"\nflags of {prog} (--help: this text):")
  own = {flag.name: flag for module, module_flags
         in flag_values.flags_by_module_dict().items()
         if module != "absl.flags" for flag in module_flags}
  for name, flag in sorted(own.items()):
    text = f"--{name}: {flag.help}"
    if flag.default not in (None, [], ""):
      text += f" (default: {flag.default_as_str})"
    print(flags.text_wrap(text, indent="      ", firstline_indent="  "))


def guard(body: Callable[[], "int | None"],
          output: Callable[[], str | None] = lambda: None) -> int:
  """``body()``'s exit status, with the errors a user fixes turned into one
  ``error:`` line and status 2, and a preemption into status 75.

  A full disk found in another thread or in a library's error log (orbax
  saves in background threads and logs their failures with tracebacks) is
  kept back and reported as the cause, even when the main thread then fails
  with a secondary error, or not at all. Anything else propagates with its
  traceback; ``SystemExit`` passes.
  """
  watch = _DiskFullWatch().install()
  try:
    status = body()
  except BaseException as e:  # noqa: BLE001 - classified, else re-raised
    status = _status_of(e, watch.first, output)
    if status is None:
      raise
  else:
    if watch.first is not None:  # a write failed: the output is incomplete
      print(f"error: {disk_full_line(watch.first, output())}",
            file=sys.stderr)
      status = EXIT_USER_ERROR
  finally:
    watch.uninstall()
  return EXIT_OK if status is None else int(status)


def _status_of(error: BaseException, thread_disk_full: BaseException | None,
               output: Callable[[], str | None]) -> int | None:
  """The exit status for ``error`` after printing its line, or ``None``
  when it is a bug (or an exit) that keeps its traceback."""
  if isinstance(error, (SystemExit, KeyboardInterrupt)):
    return None
  disk_full = _disk_full_in(error)
  if disk_full is not None or thread_disk_full is not None:
    # The path: of the first failure, else where the main thread saw it.
    cause = thread_disk_full or disk_full
    print(f"error: {disk_full_line(cause, output(), also=error)}",
          file=sys.stderr)
    return EXIT_USER_ERROR
  # Looked up, not imported: preemption imports jax, which a command that
  # never trains (report, --help) need not load.
  preemption = sys.modules.get("slkd_jax.preemption")
  if preemption is not None and isinstance(error, preemption.Preempted):
    print(f"stopped: {error}", file=sys.stderr)
    return preemption.PREEMPTED_EXIT_CODE
  if isinstance(error, errors.UserError):
    print(f"error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR
  return None


# ---------------------------------------------------------------------------
# A full disk.


def _chain(error: BaseException):
  """``error`` and the exceptions it was raised from or while handling,
  innermost (the first to happen) last."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` itself says a disk or quota is full."""
  if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
    return True
  return bool(_DISK_FULL_TEXT.search(str(error)))


def _disk_full_in(error: BaseException) -> BaseException | None:
  """The first disk-full error in ``error``'s chain: the real cause when
  cleanup raised secondary errors after it."""
  found = [e for e in _chain(error) if is_disk_full(e)]
  return found[-1] if found else None


def disk_full_line(error: BaseException, output: str | None = None,
                   also: BaseException | None = None) -> str:
  """One line: which path could not be written (from ``error``, else from
  ``also``, the error that carried it; else ``output``), and what to do."""
  path = _failed_path(error) or (also and _failed_path(also)) or output
  if path and _ORBAX_TMP in path:  # orbax writes a step under a temporary name
    path = path[:path.index(_ORBAX_TMP)]
  what = ("disk quota exceeded" if getattr(error, "errno", None) ==
          errno.EDQUOT or "quota" in str(error).lower()
          else "no space left on device")
  return (f"{what} while writing {path or 'the output'}: free space on that "
          f"disk (or raise the quota), then rerun the same command (training "
          f"resumes from its last checkpoint)")


def _failed_path(error: BaseException) -> str | None:
  """The file a failed write was writing, from the errors of ``error``'s
  chain, the first first: an OSError's filename, else an open file in the
  frame that failed (``f.write`` / ``f.flush`` raise without one), else a
  quoted path in the message (tensorstore's wording)."""
  chain = list(_chain(error))[::-1]
  for e in chain:
    if getattr(e, "filename", None):
      return str(e.filename)
  for e in chain:
    for frame in reversed(_frames(e)):  # innermost first
      for value in frame.f_locals.values():
        name = _open_file_name(value)
        if name:
          return name
  for e in chain:
    quoted = re.search(r"""["']((?:/|\w:\\)[^"']+)["']""", str(e))
    if quoted:
      return quoted.group(1)
  return None


def _frames(error: BaseException) -> list:
  frames, traceback = [], error.__traceback__
  while traceback is not None:
    frames.append(traceback.tb_frame)
    traceback = traceback.tb_next
  return frames


def _open_file_name(value: Any) -> str | None:
  """The name of ``value`` if it is a file, or of a file it holds (such as
  a log writer's ``self._file``)."""
  candidates = [value, *getattr(value, "__dict__", {}).values()]
  for candidate in candidates:
    if isinstance(candidate, io.IOBase) and isinstance(
        getattr(candidate, "name", None), str):
      return candidate.name
  return None


class _DiskFullWatch:
  """While installed, records the first disk-full error raised in another
  thread or logged with its exception by a library (and drops that log
  record: the error is reported once, in one line)."""

  _LOGGERS = ("", "absl")  # the root logger and absl's (orbax logs there)

  def __init__(self):
    self.first: BaseException | None = None
    self._previous_hook = None

  def _seen(self, error: BaseException | None) -> bool:
    found = _disk_full_in(error) if error is not None else None
    if found is not None and self.first is None:
      self.first = found
    return found is not None

  def filter(self, record: std_logging.LogRecord) -> bool:
    """The logging filter: keep every record but a disk-full error's."""
    return not (record.exc_info and self._seen(record.exc_info[1]))

  def install(self) -> "_DiskFullWatch":
    self._previous_hook = threading.excepthook

    def hook(args):
      if not self._seen(args.exc_value):
        self._previous_hook(args)

    threading.excepthook = hook
    for name in self._LOGGERS:
      std_logging.getLogger(name).addFilter(self)
    return self

  def uninstall(self) -> None:
    threading.excepthook = self._previous_hook
    for name in self._LOGGERS:
      std_logging.getLogger(name).removeFilter(self)


# ---------------------------------------------------------------------------
# Flags.


def flag_error_line(error: BaseException, argv: Sequence[str]) -> str:
  """One line for a flag-parsing failure: the innermost cause, the config
  override it came from for an unknown key."""
  cause = error
  while cause.__cause__ is not None or cause.__context__ is not None:
    cause = cause.__cause__ or cause.__context__
  if isinstance(cause, (AttributeError, KeyError)):
    key = str(cause).strip("'\" ")
    flag = next((a.split("=")[0] for a in argv
                 if a.startswith("--config.") and key in a.split("=")[0]),
                f"--config...{key}")
    return (f"{flag}: the config has no key {key!r}; check the spelling "
            f"against the config file")
  if isinstance(error, flags.Error) and not isinstance(cause, (
      OSError, errors.UserError)):
    cause = error  # absl's message names the flag and the value
  lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
  if isinstance(cause, OSError) and lines:
    return lines[-1]  # "[Errno 2] No such file or directory: '...'"
  return lines[0] if lines else type(cause).__name__


def config_value(flag: flags.Flag) -> Any:
  """The config of an ml_collections config flag (``flag_values[name]``),
  loaded now; a file that fails to load is a
  :class:`~slkd_jax.errors.ConfigError` naming it."""
  try:
    config = flag.value
    if config is not None:
      config.get("method")  # the file loads lazily: a failure surfaces here
    return config
  except OSError as e:
    raise errors.ConfigError(
        f"--{flag.name}: {flag_error_line(e, ())}") from None


def unexpected(positional: Sequence[str]) -> None:
  """A command that takes no positional arguments rejects them."""
  if positional:
    raise errors.ConfigError(
        f"unexpected arguments: {' '.join(positional)} (flags are "
        f"--name=value; see --help)")


# ---------------------------------------------------------------------------
# The process entry.


class QuietLibraries:
  """Drop INFO records of chatty libraries (orbax logs every save and
  restore step by step) so progress and results stay readable; warnings
  still pass."""

  def filter(self, record) -> bool:
    return (record.levelno > std_logging.INFO
            or "orbax" not in record.pathname)


def start(main: Callable[[Sequence[str]], int]) -> None:
  """Run ``main(sys.argv[1:])`` as an absl app and exit with its status.

  absl's ``app.run`` sets logging up (INFO to stderr) and keeps bugs'
  tracebacks; the command's own flags are parsed by :func:`run`, so the
  global absl flags are only marked parsed here.
  """
  from absl import app

  def no_global_flags(argv):
    flags.FLAGS.mark_as_parsed()
    return argv

  std_logging.getLogger("absl").addFilter(QuietLibraries())
  app.run(lambda argv: _last_word(main(argv[1:])),
          flags_parser=no_global_flags)


def _last_word(status: int) -> int:
  """After a failure's one line, nothing more: library threads still
  running at exit (orbax's, after a failed save) would print secondary
  errors ("Event loop is closed"...) while the interpreter shuts down."""
  if status:
    sys.stdout.flush()
    sys.stderr.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
  return status
