"""`aockpt push` and `aockpt hook install`: thin commands over aockpt.hub and aockpt.hook (errors are turned into one line
by the main group's error table in cli.py)."""

from __future__ import annotations

import click

from . import hook as git_hook, hub

# Shared by every verb that reads a checkpoint (cli.py imports it from here).
CPU_PACKER = click.option(
    "--cpu-packer", default=None, metavar="PACKER",
    help="Which CPU packer wrote int4 weights whose file does not say (legacy Int4CPULayout pickles): "
         "cpu-avx512, cpu-avx2, cpu-default, or native if the file was made on this machine.")


@click.command("push")
@click.argument("path", type=click.Path())
@click.argument("repo_id")
@click.option("--revision", default=None, help="Branch to commit to (created from main if missing).")
@click.option("--private", is_flag=True, help="Create the repo private (only when it does not exist yet).")
@click.option("--create-pr", is_flag=True, help="Open a pull request instead of committing to the branch.")
@click.option("-m", "--commit-message", default=None, help="Commit message.")
@click.option("--token", default=None, envvar="HF_TOKEN", show_envvar=True,
              help="Hub token with write access (default: the one saved by `hf auth login`).")
@click.option("--endpoint", default=None, envvar="HF_ENDPOINT", show_envvar=True,
              help="Hub URL (default https://huggingface.co).")
@click.option("--no-progress", is_flag=True, help="No progress bars even on a terminal.")
@CPU_PACKER
def push(path: str, repo_id: str, revision: str | None, private: bool, create_pr: bool,
         commit_message: str | None, token: str | None, endpoint: str | None, no_progress: bool,
         cpu_packer: str | None) -> None:
    """Check, card and upload a checkpoint to the Hugging Face Hub in one commit.

    PATH is a packed folder or anything `aockpt pack` reads (packed on the fly). Pickles and safetensors
    that are not packed or fail `aockpt verify` are never uploaded.

    \b
    aockpt push packed/ me/llama-int8
    aockpt push model.pt me/llama-int8 --create-pr -m "int8 weights"
    """
    url = hub.push(path, repo_id, revision=revision, private=private, create_pr=create_pr,
                   commit_message=commit_message, token=token, progress=not no_progress, endpoint=endpoint,
                   cpu_packer=cpu_packer)
    click.echo(url)


@click.group("hook")
def hook() -> None:
    """Git hooks that keep pickles and broken checkpoints out of a repository."""


@hook.command("install")
@click.argument("repo_dir", default=".", type=click.Path(exists=True, file_okay=False))
@click.option("--force", is_flag=True, help="Install over a pre-push hook aockpt did not write, or edited by "
              "hand: it is kept as pre-push.aockpt-chained and still runs first.")
def install(repo_dir: str, force: bool) -> None:
    """Install a pre-push hook in the git clone REPO_DIR (default: here).

    The hook refuses a push when any pushed commit adds a torch pickle (.bin, .pt, .pth, .pkl, .ckpt, or
    zip/pickle bytes) or safetensors that are not packed by aockpt or fail `aockpt verify`.

    \b
    aockpt hook install ~/models/llama-int8
    """
    click.echo(f"installed {git_hook.install_hook(repo_dir, force=force)}")
