"""Operator commands: ``flask --app wsgi models|users|tokens ...`` (honour DATA_DIR and DATABASE_URL)."""

from __future__ import annotations

import sys

import click
from flask import current_app
from flask.cli import with_appcontext
from sqlalchemy import select

from .access.accounts import change_password, password_problem, revoke_sessions
from .extensions import db
from .models import ROLES, ApiToken, User, utcnow
from .serving.bundle import BundleError
from .serving.registry import RegistryError, activate, import_bundle, import_defaults, list_versions, rollback


def _fail(message: str) -> None:
    raise click.ClickException(message)


@click.group("models", help="Import, list, activate and roll back model versions.")
def models_cli() -> None:
    pass


@models_cli.command("list")
@click.option("--taxonomy", default=None, help="Only this taxonomy's versions.")
@with_appcontext
def models_list(taxonomy: str | None) -> None:
    versions = list_versions(taxonomy)
    if not versions:
        click.echo("no model versions; import one with `flask --app wsgi models import PATH`")
    for v in versions:
        active = "*" if v.taxonomy.active_version_id == v.id else " "
        metrics = v.test_metrics
        f1 = " ".join(f"{k}={metrics[k]:.3f}" for k in ("micro_f1", "macro_f1") if isinstance(metrics.get(k), float))
        status = "" if v.status == "ready" else f" [{v.status}: {v.validation_error}]"
        click.echo(f"{active} {v.id}  {len(v.labels)} labels  {v.created_at:%Y-%m-%d %H:%M}  {f1}{status}".rstrip())


@models_cli.command("import")
@click.argument("path", type=click.Path(exists=True))
@with_appcontext
def models_import(path: str) -> None:
    """Validate and store a bundle directory or .tar.gz; prints the version id as the last line."""
    try:
        result = import_bundle(path, actor="cli")
    except BundleError as exc:
        _fail(f"bundle refused: {exc}")
    v = result.version
    state = "imported" if result.created else "already imported"
    active = "active" if v.taxonomy.active_version_id == v.id else "not active: `flask --app wsgi models activate`"
    click.echo(f"{state}: {v.taxonomy.slug}, {len(v.labels)} labels ({active})")
    click.echo(v.id)


@models_cli.command("import-defaults")
@with_appcontext
def models_import_defaults() -> None:
    """Import the shipped bundles (DEFAULT_BUNDLES_DIR) whose taxonomy has no version yet."""
    for line in import_defaults(current_app.config["DEFAULT_BUNDLES_DIR"]):
        click.echo(line)


@models_cli.command("activate")
@click.argument("version")
@with_appcontext
def models_activate(version: str) -> None:
    try:
        activated = activate(version, actor="cli")
    except RegistryError as exc:
        _fail(str(exc))
    click.echo(f"{activated.taxonomy.slug}: active version is now {activated.id}")


@models_cli.command("rollback")
@click.argument("taxonomy")
@with_appcontext
def models_rollback(taxonomy: str) -> None:
    try:
        target = rollback(taxonomy, actor="cli")
    except RegistryError as exc:
        _fail(str(exc))
    click.echo(f"{taxonomy}: rolled back, active version is now {target.id}")


def _get_or_create_user(name: str, role: str) -> tuple[User, bool]:
    user = db.session.scalar(select(User).where(User.name == name))
    if user is not None:
        return user, False
    user = User(name=name, role=role)
    db.session.add(user)
    return user, True


@click.group("users", help="Manage curator and admin accounts.")
def users_cli() -> None:
    pass


@users_cli.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="curator", show_default=True)
@with_appcontext
def users_create(name: str, role: str) -> None:
    """Create a user, or update an existing one's role and password (reactivating it if it was deactivated);
    the password comes from stdin when piped."""
    if not name.strip() or len(name) > 120:
        _fail("name must be 1 to 120 characters")
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    problem = password_problem(password)
    if problem:
        _fail(problem)
    user, created = _get_or_create_user(name.strip(), role)
    user.role = role
    user.active = True
    change_password(user, password)  # an existing user's sessions all end: the old password may be known
    click.echo(f"{'created' if created else 'updated'} {role} {user.name}")


@users_cli.command("deactivate")
@click.argument("name")
@with_appcontext
def users_deactivate(name: str) -> None:
    """Deactivate user NAME: it cannot sign in, its sessions end now and its API tokens are revoked."""
    user = db.session.scalar(select(User).where(User.name == name.strip()))
    if user is None:
        _fail(f"there is no user {name}")
    user.active = False
    revoke_sessions(user)
    for token in user.tokens:  # revoked for good: reactivating the account later must not revive them
        token.revoked_at = token.revoked_at or utcnow()
    db.session.commit()
    click.echo(f"deactivated {user.role} {user.name}: signed out everywhere, tokens refused")


@click.group("tokens", help="Issue API tokens.")
def tokens_cli() -> None:
    pass


@tokens_cli.command("create")
@click.argument("name")
@click.option("--role", type=click.Choice(ROLES), default="curator", show_default=True)
@click.option("--label", default="cli", show_default=True, help="What the token is for.")
@with_appcontext
def tokens_create(name: str, role: str, label: str) -> None:
    """Issue a token for user NAME (created without a password if missing); the token is the last line."""
    if not name.strip() or len(name) > 120:
        _fail("name must be 1 to 120 characters")
    user, created = _get_or_create_user(name.strip(), role)
    if not created and user.role != role:
        _fail(f"user {user.name} exists with role {user.role}; run `flask users create {user.name} --role {role}`")
    token, plain = ApiToken.issue(user, name=label)
    db.session.add(token)
    db.session.commit()
    click.echo(f"token for {role} {user.name} (shown once, store it now):")
    click.echo(plain)
