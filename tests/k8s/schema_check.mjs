// Validates rendered Kubernetes objects against the API schemas of the npm
// packages kubernetes-models (built-in kinds) and @kubernetes-models/* (CRDs:
// prometheus-operator's PodMonitor; cert-manager's Issuer and Certificate
// when @kubernetes-models/cert-manager is installed), and rejects fields the
// schema does not know.
//
// Those packages ship their OpenAPI schemas compiled into ajv validators
// that, like the API server's validation, ignore unknown properties. A
// compiled validator reads every property its schema declares
// (`data.imagePullPolicy`) and enumerates the keys only of free-form maps
// (labels, resources.limits, ConfigMap data). So the validator runs on a
// proxy of the object that records which keys it read and whether it
// enumerated them: a key that was neither read nor enumerated is not in the
// schema, which is how `kubectl apply --validate=strict` would reject it.

import path from 'node:path';
import fs from 'node:fs';
import { pathToFileURL } from 'node:url';

// Where the model packages live: apiVersion "group/version" (or "v1") and
// kind select `<package>/<group>/<version>/<Kind>.js`.
const kModelPackages = ['kubernetes-models', '@kubernetes-models/prometheus-operator'];
// Packages used when installed (API group -> package): without one, objects
// of its groups are reported unchecked (skipped) rather than failing.
const kOptionalModelPackages = new Map([
  ['cert-manager.io', '@kubernetes-models/cert-manager'],
]);

export class SchemaChecker {
  // nodeModules: the node_modules directory holding kModelPackages.
  constructor(nodeModules) {
    this.nodeModules = nodeModules;
    this.models = new Map();  // "apiVersion/kind" -> model class, or null
  }

  // The model packages missing from nodeModules.
  missingPackages() {
    return kModelPackages.filter((name) => !this.installed(name));
  }

  installed(name) {
    return fs.existsSync(path.join(this.nodeModules, name, 'package.json'));
  }

  // The optional package that would hold the schema of `object`, when it is
  // not installed (the object cannot be checked); else null.
  missingOptionalPackage(object) {
    const group = String(object?.apiVersion ?? '').split('/').slice(0, -1).join('/');
    const pkg = kOptionalModelPackages.get(group);
    return pkg && !this.installed(pkg) ? pkg : null;
  }

  async model(apiVersion, kind) {
    const key = `${apiVersion}/${kind}`;
    if (!this.models.has(key)) {
      let found = null;
      for (const pkg of [...kModelPackages, ...kOptionalModelPackages.values()]) {
        const file = path.join(this.nodeModules, pkg, ...apiVersion.split('/'), `${kind}.js`);
        if (!fs.existsSync(file)) continue;
        found = (await import(pathToFileURL(file).href))[kind] ?? null;
        if (found) break;
      }
      this.models.set(key, found);
    }
    return this.models.get(key);
  }

  // Returns a list of problems with `object` (empty when it is valid): schema
  // errors, then every field its schema does not declare, as a path like
  // spec.template.spec.containers[0].imagePullPolcy.
  async check(object) {
    const { apiVersion, kind } = object ?? {};
    if (typeof apiVersion !== 'string' || typeof kind !== 'string') {
      return ['no apiVersion or kind'];
    }
    const Model = await this.model(apiVersion, kind);
    if (!Model) return [`no schema for ${apiVersion} ${kind} in ${kModelPackages.join(', ')}`];
    const visits = [];
    const traced = trace(object, '', visits);
    try {
      // The model's validate() runs its compiled schema on `this`.
      Model.prototype.validate.call(traced);
    } catch (error) {
      // With schema errors the validator may stop early; report those alone.
      return error.message.split(', ').map((message) => `schema: ${message}`);
    }
    const unknown = [];
    for (const visit of visits) {
      if (visit.isArray || visit.enumerated) continue;
      for (const key of visit.keys) {
        if (!visit.read.has(key)) unknown.push(`unknown field ${joinPath(visit.path, key)}`);
      }
    }
    return unknown;
  }
}

function joinPath(parent, key) {
  return parent === '' ? key : `${parent}.${key}`;
}

// A proxy of `value` (recursively) that records into `visits`, per object,
// the keys read and whether the keys were enumerated.
function trace(value, where, visits) {
  if (value === null || typeof value !== 'object') return value;
  const visit = {
    path: where,
    isArray: Array.isArray(value),
    keys: Object.keys(value),
    read: new Set(),
    enumerated: false,
  };
  visits.push(visit);
  const copy = visit.isArray
    ? value.map((item, i) => trace(item, `${where}[${i}]`, visits))
    : Object.fromEntries(Object.entries(value).map(
      ([key, item]) => [key, trace(item, joinPath(where, key), visits)]));
  return new Proxy(copy, {
    get(target, key, receiver) {
      if (typeof key === 'string') visit.read.add(key);
      return Reflect.get(target, key, receiver);
    },
    has(target, key) {
      if (typeof key === 'string') visit.read.add(key);
      return Reflect.has(target, key);
    },
    ownKeys(target) {
      visit.enumerated = true;
      return Reflect.ownKeys(target);
    },
  });
}
