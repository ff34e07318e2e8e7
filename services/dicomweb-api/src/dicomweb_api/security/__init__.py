"""Who may do what: authentication (OIDC bearer tokens, API tokens,
configured anonymous access), role-based permissions, audit."""

from dicomweb_api.security.dependencies import AuthenticationError, Authenticator, Principal, Require, require
from dicomweb_api.security.permissions import ROLE_PERMISSIONS, Permission, Role, permissions_of

__all__ = [
    "ROLE_PERMISSIONS",
    "AuthenticationError",
    "Authenticator",
    "Permission",
    "Principal",
    "Require",
    "Role",
    "permissions_of",
    "require",
]
