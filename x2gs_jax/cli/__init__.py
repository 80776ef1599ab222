"""Command-line entry points: `x2gs-train` / `python train.py` (`cli.train`) and `x2gs-eval` / `python eval.py`
(`cli.eval`). Their absl flags are defined when `run()` starts, not on import, so both modules import side by side."""
import os
import sys


def put_config_root_on_path(argv) -> None:
    """The config files import their shared defaults as `configs.common`: put the folder above a `--config` file's
    `configs/` folder on sys.path (what `python train.py` gets from the repository root being the script's folder),
    so the installed `x2gs-train` reads them from anywhere."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        elif arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        else:
            continue
        root = os.path.dirname(os.path.dirname(os.path.abspath(value.split(":", 1)[0])))
        if os.path.isfile(os.path.join(root, "configs", "common.py")) and root not in sys.path:
            sys.path.insert(0, root)


def use_docstring_as_usage(doc: str) -> None:
    """absl prints the __main__ module's docstring as the usage of --help; a console script has none: use `doc`."""
    main = sys.modules.get("__main__")
    if main is not None and not getattr(main, "__doc__", None):
        main.__doc__ = doc


def show_flags_in_help(holders) -> None:
    """absl's --help lists the key flags of the main program (sys.argv[0]); the commands define theirs in this
    package, so declare them key flags of the program too."""
    from absl import flags

    for holder in holders:
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[holder.name])


def launch(doc: str, define_flags, flag_holders: dict, main, configs_from_argv: bool = False) -> None:
    """Start a command under absl: its docstring as the usage, its flags defined (into `flag_holders`) and listed by
    --help, then `app.run(main)`. configs_from_argv: the config files' folder goes on sys.path first
    (`put_config_root_on_path`)."""
    from absl import app

    if configs_from_argv:
        put_config_root_on_path(sys.argv)
    use_docstring_as_usage(doc)
    define_flags()
    show_flags_in_help(flag_holders.values())
    app.run(main)
