"""Roles and what each may do (RBAC).

Every route declares the permission it needs with ``Depends(require(...))``;
a role grants a set of permissions.  The four roles a hospital expects:

=============  ==============================================================
viewer         search and retrieve images (read PHI)
technologist   viewer + store, worklist and MPPS, study locks
radiologist    viewer + clinical data (annotations, key images), de-identified export
administrator  everything, including delete, nodes, users, tokens, audit, configuration
=============  ==============================================================
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Permission(StrEnum):
    READ = "read"  # QIDO, WADO, metadata, REST reads of patients/studies
    STORE = "store"  # STOW-RS, imports
    DELETE = "delete"  # DELETE of studies/series/instances
    WORKFLOW = "workflow"  # worklist items, MPPS view
    CLINICAL = "clinical"  # annotations, measurements, key images, viewer state
    EXPORT = "export"  # de-identified copies, exports
    ADMIN = "admin"  # nodes, routing, jobs, users, roles, tokens, audit, configuration


class Role(StrEnum):
    VIEWER = "viewer"
    TECHNOLOGIST = "technologist"
    RADIOLOGIST = "radiologist"
    ADMINISTRATOR = "administrator"


ROLE_PERMISSIONS: Final[dict[Role, frozenset[Permission]]] = {
    Role.VIEWER: frozenset({Permission.READ}),
    Role.TECHNOLOGIST: frozenset({Permission.READ, Permission.STORE, Permission.WORKFLOW}),
    Role.RADIOLOGIST: frozenset({Permission.READ, Permission.CLINICAL, Permission.EXPORT}),
    Role.ADMINISTRATOR: frozenset(Permission),
}


def permissions_of(roles: frozenset[Role] | set[Role]) -> frozenset[Permission]:
    granted: set[Permission] = set()
    for role in roles:
        granted |= ROLE_PERMISSIONS.get(role, frozenset())
    return frozenset(granted)
