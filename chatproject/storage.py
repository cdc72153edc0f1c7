"""Where collectstatic puts the static files, and under which names."""

from whitenoise.storage import CompressedManifestStaticFilesStorage


class StaticFilesStorage(CompressedManifestStaticFilesStorage):
    """WhiteNoise's compressed files with hashed names, the page's JavaScript
    modules included: Django rewrites each `import ... from "./x.js"` to the
    hashed name, so that a cached module never outlives its release."""

    support_js_module_import_aggregation = True
