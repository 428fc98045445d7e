"""Buildout recipes for instances deployed by the unmodified `slapos node`,
and the extension that lets SlapOS's own recipes run on PyPI's zc.buildout.

SlapOS's own recipes (slapos.cookbook) run on SlapOS's fork of zc.buildout,
which lets an option hold any Python object; zc.buildout from PyPI (the one
slapos.core installs) accepts only strings and raises "Option values must be
strings" when `slapos.cookbook:slapconfiguration` stores its address sets,
its parameter dict and the shared instance list. A profile that names this
package in `[buildout] extensions` gets `extension`, which stores such a
value as text instead (see `as_option_text`), so the cookbook's recipes run
unmodified.

The recipes do the same work as the cookbook's with string options only,
through the real client library (`slapos.slap`):

- `configuration`: reads the partition's instance from the Master
  (`registerComputerPartition`): software type, title, addresses, and one
  `configuration.<key>` option per string parameter (`default.<key>` gives
  the value when the instance has none); `slave-instance-list` as JSON.
- `switch`: runs the profile named for the partition's software type as a
  sub-buildout (the shape of SlapOS's `switch-softwaretype`).
- `request`: requests an instance from this partition
  (`requestComputerPartition`) and exposes `connection-<name>` for each name
  in `return`; fails while one is missing, so slapgrid retries the partition
  on its next run, as SlapOS's request recipe does.
- `publish`: publishes connection parameters
  (`setComputerPartitionConnectionXml`); with `shared-url-base`, also one
  `url` per shared instance this partition hosts (a section with only that
  publishes nothing for the partition itself).
- `file`: writes `inline` to `output`, with `$${` made `${` (PyPI's
  zc.buildout keeps the escape as it is), so a software build can write
  the instance profiles.
- `service`: writes an executable wrapper into `etc/service/`, which slapgrid
  gives to the partition's supervisord.
"""

import json
import logging
import os
import shlex

import slapos.slap
import zc.buildout
import zc.buildout.buildout

log = logging.getLogger("slapos_rs_recipe")


def as_option_text(value):
    """The text an option holds for a value that is not a string: sets as
    sorted JSON lists, lists, tuples and dicts as JSON (keys sorted),
    booleans as `true`/`false`, None as empty, numbers as written."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return json.dumps(sorted(value, key=str), default=str)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return json.dumps(value, sort_keys=True, default=str)


def extension(buildout):
    """Buildout extension: options take any value, stored as text
    (`as_option_text`), as SlapOS's fork of zc.buildout lets recipes do."""
    options = zc.buildout.buildout.Options
    if getattr(options.__setitem__, "_stores_any_value", False):
        return
    strings_only = options.__setitem__

    def __setitem__(self, option, value):
        if not isinstance(value, str):
            value = as_option_text(value)
        strings_only(self, option, value)

    __setitem__._stores_any_value = True
    options.__setitem__ = __setitem__


def _partition(options):
    """The slap handle of this partition, from the `[slap-connection]` options."""
    slap = slapos.slap.slap()
    slap.initializeConnection(
        options["server-url"],
        options.get("key-file") or None,
        options.get("cert-file") or None,
    )
    return slap.registerComputerPartition(options["computer-id"], options["partition-id"])


class Configuration:
    """Exposes this partition's instance as string options."""

    def __init__(self, buildout, name, options):
        partition = _partition(options)
        parameters = dict(partition.getInstanceParameterDict())
        options["software-type"] = parameters.pop("slap_software_type", "default") or "default"
        options["instance-title"] = str(parameters.pop("instance_title", ""))
        options["root-instance-title"] = str(parameters.pop("root_instance_title", ""))
        options["instance-state"] = partition.getState()
        addresses = [ip for _, ip in parameters.pop("ip_list", [])]
        ipv4 = sorted(ip for ip in addresses if ":" not in ip)
        ipv6 = sorted(ip for ip in addresses if ":" in ip)
        options["ipv4"] = " ".join(ipv4)
        options["ipv4-random"] = ipv4[0] if ipv4 else ""
        options["ipv6-random"] = ipv6[0] if ipv6 else ""
        options["slave-instance-list"] = json.dumps(parameters.pop("slave_instance_list", []), sort_keys=True)
        for key, value in list(options.items()):
            if key.startswith("default."):
                options["configuration." + key[len("default."):]] = value
        for key, value in parameters.items():
            if isinstance(value, str) and key.replace("-", "_").replace(".", "_").isidentifier():
                options["configuration." + key] = value
        options["configuration"] = json.dumps(parameters, sort_keys=True, default=str)

    def install(self):
        return []

    update = install


class _SubBuildout(zc.buildout.buildout.Buildout):
    """A buildout run inside the partition's buildout, sharing its logging."""

    def __init__(self, main, profile, settings):
        self._logger = main._logger
        self._log_level = main._log_level
        super().__init__(profile, settings, False)

    def _setup_logging(self):
        pass


class Switch:
    """Runs the profile named by the software type (`<type> = <path>`)."""

    def __init__(self, buildout, name, options):
        self.buildout, self.name, self.options = buildout, name, options
        software_type = buildout["slap-configuration"]["software-type"]
        if software_type == "RootSoftwareInstance":
            software_type = "default"
        if software_type not in options:
            raise zc.buildout.UserError(
                "software type %r is not provided by this release (it has: %s)"
                % (software_type, ", ".join(k for k in options if k != "recipe"))
            )
        self.software_type = software_type
        self.profile = options[software_type]

    def install(self):
        main = self.buildout["buildout"]
        settings = [
            ("buildout", "installed", ".installed-%s.cfg" % self.name),
            ("buildout", "directory", main["directory"]),
            ("buildout", "offline", "true"),
        ]
        for key in ("eggs-directory", "develop-eggs-directory", "bin-directory"):
            if key in main:
                settings.append(("buildout", key, main[key]))
        for key, value in self.buildout["slap-connection"].items():
            settings.append(("slap-connection", key, value))
        _SubBuildout(self.buildout, self.profile, settings).install([])
        return []

    update = install


class Request:
    """Requests an instance from this partition and reads its connection."""

    def __init__(self, buildout, name, options):
        self.name, self.options = name, options
        parameters = {k[len("config-"):]: v for k, v in options.items() if k.startswith("config-")}
        sla = {k[len("sla-"):]: v for k, v in options.items() if k.startswith("sla-") and v}
        shared = options.get("shared", "false").lower() in ("true", "yes", "1")
        requested = _partition(options).request(
            options["software-url"],
            options.get("software-type", "default"),
            options.get("name", name),
            shared=shared,
            partition_parameter_kw=parameters,
            filter_kw=sla,
            state=options.get("state", "started"),
        )
        self.missing = []
        connection = requested.getConnectionParameterDict()
        for key in options.get("return", "").split():
            if key in connection:
                options["connection-" + key] = str(connection[key])
            else:
                self.missing.append(key)
                options["connection-" + key] = ""

    def install(self):
        if self.missing:
            # Not an error of this partition: the requested instance has not
            # published yet. Failing makes slapgrid try again next run.
            raise zc.buildout.UserError(
                "%s has not published %s yet" % (self.options.get("name", self.name), ", ".join(self.missing))
            )
        return []

    update = install


_CONNECTION_OPTIONS = ("recipe", "server-url", "key-file", "cert-file", "computer-id", "partition-id", "shared-url-base")


class Publish:
    """Publishes every other option as a connection parameter."""

    def __init__(self, buildout, name, options):
        self.buildout, self.options = buildout, options

    def install(self):
        partition = _partition(self.options)
        published = {k: v for k, v in self.options.items() if k not in _CONNECTION_OPTIONS}
        # With nothing of its own (only shared URLs), the partition's
        # connection parameters are left to another section.
        if published:
            partition.setConnectionDict(published)
        base = self.options.get("shared-url-base")
        if base:
            hosted = json.loads(self.buildout["slap-configuration"]["slave-instance-list"])
            for shared in hosted:
                reference = shared["slave_reference"]
                url = "%s/%s" % (base.rstrip("/"), reference)
                partition.setConnectionDict({"url": url}, reference)
        return []

    update = install


class File:
    """Writes `inline` (unescaped) to `output`."""

    def __init__(self, buildout, name, options):
        self.options = options

    def install(self):
        path = self.options["output"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(self.options["inline"].replace("$$", "$") + "\n")
        return [path]

    update = install


class Service:
    """Writes `etc/service/<name>`: runs `command` in the partition."""

    def __init__(self, buildout, name, options):
        directory = buildout["buildout"]["directory"]
        options["path"] = os.path.join(directory, "etc", "service", options.get("service-name", name))
        self.options = options

    def install(self):
        path = self.options["path"]
        os.makedirs(os.path.dirname(path), exist_ok=True)
        command = shlex.split(self.options["command"])
        with open(path, "w") as f:
            f.write("#!/bin/sh\nexec %s\n" % " ".join(shlex.quote(a) for a in command))
        os.chmod(path, 0o750)
        return [path]

    update = install
