// Checks that one rendered set of manifests agrees with the muonps binary and
// with itself: what `kubectl apply` accepts but a running cluster would not.
//
// checkContract(objects, muonps) returns [[check name, [problem, ...]], ...];
// a check passes when its list is empty.

import { envName, isRole } from './binary_flags.mjs';

const kUser = 65532;
const kWildcardHosts = ['0.0.0.0', '::', '[::]', ''];
const kStandardResources = ['cpu', 'memory', 'ephemeral-storage'];

export function checkContract(objects, muonps) {
  const cluster = new Cluster(objects);
  const results = [];
  const add = (name, problems) => results.push([name, problems]);

  if (cluster.workloads.length === 0) add('muonps workloads', ['no Deployment or StatefulSet']);
  for (const roleName of ['coordinator', 'shard', 'worker']) {
    const count = cluster.workloads.filter((w) => w.role === roleName).length;
    add(`one ${roleName} workload`, count === 1 ? [] : [`${count} workloads run muonps ${roleName}`]);
  }
  for (const workload of cluster.workloads) {
    const label = `${workload.kind}/${workload.name}`;
    const settings = new Settings(workload, cluster);
    add(`${label}: runs a muonps role`, roleProblems(workload, muonps));
    if (!isRole(workload.role)) continue;
    add(`${label}: flags and MUONPS_* variables exist for muonps ${workload.role}`,
      [...settings.problems, ...flagProblems(workload, settings, muonps)]);
    add(`${label}: listen port = containerPort "grpc" = gRPC probe ports`, listenProblems(workload, settings));
    add(`${label}: metrics port = containerPort "metrics" = prometheus.io annotations`,
      metricsProblems(workload, settings));
    add(`${label}: threads match the CPU limit; requests and limits set`, resourceProblems(workload, settings));
    add(`${label}: non-root, read-only root, no privileges, /tmp writable`, securityProblems(workload));
    add(`${label}: labels app.kubernetes.io/name and component select its pods`, labelProblems(workload));
    add(`${label}: every volume mount has a volume`, mountProblems(workload));
    if (workload.role !== 'coordinator') {
      add(`${label}: dials the coordinator Service at its port`, coordinatorAddressProblems(workload, settings, cluster));
    }
    if (workload.role === 'coordinator') {
      add(`${label}: min_shards = shard replicas`, minShardsProblems(settings, cluster));
    }
    if (workload.role === 'shard') {
      add(`${label}: advertises its pod name under its headless Service`, advertiseProblems(workload, settings, cluster));
    }
  }
  add('coordinator and shards share a ReadWriteMany checkpoint volume', checkpointProblems(cluster));
  for (const service of cluster.byKind('Service')) {
    add(`Service/${service.metadata.name}: selects pods, target ports exist`, serviceProblems(service, cluster));
  }
  for (const budget of cluster.byKind('PodDisruptionBudget')) {
    add(`PodDisruptionBudget/${budget.metadata.name}: selects one workload`, budgetSelectionProblems(budget, cluster));
  }
  add('coordinator and shards have budgets allowing no disruption', budgetProblems(cluster));
  const monitors = cluster.byKind('PodMonitor');
  if (monitors.length === 0) add('a PodMonitor', ['none']);
  for (const monitor of monitors) {
    add(`PodMonitor/${monitor.metadata.name}: selects every muonps pod at a port it has`, podMonitorProblems(monitor, cluster));
  }
  return results;
}

// --- The rendered objects --------------------------------------------------

class Cluster {
  constructor(objects) {
    this.objects = objects;
    this.workloads = objects
      .filter((o) => ['Deployment', 'StatefulSet'].includes(o.kind))
      .map((o) => new Workload(o));
  }

  byKind(kind) {
    return this.objects.filter((o) => o.kind === kind);
  }

  find(kind, name) {
    return this.objects.find((o) => o.kind === kind && o.metadata?.name === name);
  }

  // The workloads whose pods `selector` (a LabelSelector, or a Service's
  // plain map) selects.
  selected(selector) {
    return this.workloads.filter((w) => matches(selector, w.podLabels));
  }
}

class Workload {
  constructor(object) {
    this.object = object;
    this.kind = object.kind;
    this.name = object.metadata.name;
    this.replicas = object.spec.replicas ?? 1;
    this.podLabels = object.spec.template?.metadata?.labels ?? {};
    this.annotations = object.spec.template?.metadata?.annotations ?? {};
    this.pod = object.spec.template?.spec ?? {};
    this.container = this.pod.containers?.[0] ?? {};
    this.args = this.container.args ?? [];
    this.role = this.container.command ? undefined : this.args[0];
  }

  // containerPort for a port name or number, or undefined.
  containerPort(port) {
    const ports = this.pod.containers?.flatMap((c) => c.ports ?? []) ?? [];
    const found = ports.find((p) => (typeof port === 'number' ? p.containerPort === port : p.name === port));
    return found?.containerPort;
  }
}

// A label selector: {matchLabels, matchExpressions} or a plain map.
function matches(selector, labels) {
  if (!selector) return false;
  const isLabelSelector = 'matchLabels' in selector || 'matchExpressions' in selector;
  const matchLabels = isLabelSelector ? selector.matchLabels ?? {} : selector;
  const expressions = isLabelSelector ? selector.matchExpressions ?? [] : [];
  if (Object.keys(matchLabels).length === 0 && expressions.length === 0) return false;
  return Object.entries(matchLabels).every(([key, value]) => labels[key] === value) &&
    expressions.every(({ key, operator, values = [] }) => {
      switch (operator) {
        case 'In': return values.includes(labels[key]);
        case 'NotIn': return !values.includes(labels[key]);
        case 'Exists': return key in labels;
        case 'DoesNotExist': return !(key in labels);
        default: return false;
      }
    });
}

// "host:port" -> {host, port}; port NaN when absent.
function splitAddress(address) {
  const at = address.lastIndexOf(':');
  if (at < 0) return { host: address, port: NaN };
  return { host: address.slice(0, at), port: Number(address.slice(at + 1)) };
}

// --- A container's settings --------------------------------------------

// The muonps settings of a workload's container: flags from its args, else
// from MUONPS_* variables (env wins over envFrom), with sample values for
// variables set from the downward API.
class Settings {
  constructor(workload, cluster) {
    this.problems = [];
    this.vars = new Map();    // name -> {value (sample), source: 'envFrom' | 'env', from}
    this.args = new Map();    // flag -> value
    const container = workload.container;
    for (const source of container.envFrom ?? []) {
      const name = source.configMapRef?.name;
      if (!name) {
        this.problems.push('envFrom other than a configMapRef');
        continue;
      }
      const configMap = cluster.find('ConfigMap', name);
      if (!configMap) {
        this.problems.push(`envFrom names ConfigMap ${name}, which is not in the manifests`);
        continue;
      }
      for (const [key, value] of Object.entries(configMap.data ?? {})) {
        this.vars.set(`${source.prefix ?? ''}${key}`, { value: String(value), source: 'envFrom', from: name });
      }
    }
    for (const entry of container.env ?? []) {
      this.vars.set(entry.name, { value: this.sample(entry, workload), source: 'env', from: entry });
    }
    for (const [i, arg] of workload.args.slice(1).entries()) {
      const flag = arg.match(/^--?([A-Za-z0-9_]+)(?:=(.*))?$/);
      if (!flag) {
        this.problems.push(`argument ${i + 1} '${arg}' is not a --flag (a role takes no positional arguments)`);
      } else {
        this.args.set(flag[1], flag[2] ?? 'true');
      }
    }
  }

  // A value like the one the kubelet would set: $(VAR) expanded from the
  // variables defined before, the downward API filled with samples.
  sample(entry, workload) {
    if (entry.value !== undefined) {
      return String(entry.value).replace(/\$\(([A-Za-z_][A-Za-z0-9_]*)\)/g, (text, name) => {
        const earlier = this.vars.get(name);
        if (!earlier) {
          this.problems.push(`${entry.name} refers to $(${name}), not defined before it (the kubelet would keep '${text}')`);
          return text;
        }
        return earlier.value;
      });
    }
    const field = entry.valueFrom?.fieldRef?.fieldPath;
    if (field === 'metadata.name') return `${workload.name}-0`;
    if (field === 'metadata.namespace') return 'muonps';
    const resource = entry.valueFrom?.resourceFieldRef?.resource;
    if (resource) {
      const limit = workload.container.resources?.limits?.[resource.replace(/^limits\./, '')];
      return String(Math.ceil(cpuCores(limit ?? '1')));
    }
    return 'sample';
  }

  // The value muonps sees for `flag`: its argument, else its variable.
  get(flag) {
    return this.args.get(flag) ?? this.vars.get(envName(flag))?.value;
  }
}

function cpuCores(quantity) {
  const text = String(quantity);
  return text.endsWith('m') ? Number(text.slice(0, -1)) / 1000 : Number(text);
}

// --- Checks ------------------------------------------------------------------

function roleProblems(workload, muonps) {
  if (workload.container.command) return ['sets command: the image entrypoint is muonps'];
  if (!isRole(workload.role)) return [`args[0] is '${workload.role}', not coordinator, shard or worker`];
  if (!muonps.hasCommand(workload.role)) return [`muonps's usage lists no command '${workload.role}'`];
  return [];
}

function flagProblems(workload, settings, muonps) {
  const problems = [];
  for (const flag of settings.args.keys()) {
    const problem = muonps.flagProblem(flag, workload.role);
    if (problem) problems.push(`args: ${problem}`);
  }
  const vars = new Map();
  for (const [name, { value, source }] of settings.vars) {
    if (!name.startsWith('MUONPS_')) continue;
    vars.set(name, value);
    // The container's own variables are for its role; the shared ConfigMap's
    // are for whichever role uses them.
    if (source === 'env') {
      const problem = muonps.flagProblem(name.replace(/^MUONPS_/, '').toLowerCase(), workload.role);
      if (problem && !problem.includes('is not a flag')) problems.push(`env ${name}: ${problem}`);
    }
  }
  for (const [name, problem] of muonps.environmentProblems(vars)) {
    const { source, from } = settings.vars.get(name);
    problems.push(`${source === 'envFrom' ? `ConfigMap ${from}` : 'env'}: ${problem}`);
  }
  return problems;
}

// A "host:port" setting that a server binds: must be set, on every address.
function bindPort(settings, flag, problems) {
  const value = settings.get(flag);
  if (value === undefined) {
    problems.push(`--${flag} / ${envName(flag)} is not set`);
    return undefined;
  }
  const { host, port } = splitAddress(value);
  if (!kWildcardHosts.includes(host)) {
    problems.push(`${envName(flag)}=${value} binds ${host}: kubelet probes and other pods cannot reach it`);
  }
  if (!Number.isInteger(port) || port <= 0) problems.push(`${envName(flag)}=${value} has no fixed port`);
  return port;
}

function listenProblems(workload, settings) {
  const problems = [];
  const port = bindPort(settings, 'listen', problems);
  if (port === undefined) return problems;
  if (workload.containerPort('grpc') !== port) {
    problems.push(`containerPort "grpc" is ${workload.containerPort('grpc')}, muonps listens on ${port}`);
  }
  for (const kind of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
    const probe = workload.container[kind];
    if (!probe) {
      if (kind !== 'startupProbe') problems.push(`no ${kind}`);
      continue;
    }
    if (!probe.grpc) {
      problems.push(`${kind} is not a gRPC probe (grpc.health.v1 says when muonps is ready)`);
    } else if (probe.grpc.port !== port) {
      problems.push(`${kind} checks port ${probe.grpc.port}, muonps listens on ${port}`);
    }
  }
  return problems;
}

function metricsProblems(workload, settings) {
  const problems = [];
  const port = bindPort(settings, 'metrics_listen', problems);
  if (port === undefined) return problems;
  if (workload.containerPort('metrics') !== port) {
    problems.push(`containerPort "metrics" is ${workload.containerPort('metrics')}, /metrics is on ${port}`);
  }
  const expected = { 'prometheus.io/scrape': 'true', 'prometheus.io/port': String(port), 'prometheus.io/path': '/metrics' };
  for (const [key, value] of Object.entries(expected)) {
    if (workload.annotations[key] !== value) {
      problems.push(`pod annotation ${key} is ${JSON.stringify(workload.annotations[key])}, not "${value}"`);
    }
  }
  return problems;
}

function resourceProblems(workload, settings) {
  const problems = [];
  const container = workload.container;
  for (const kind of ['requests', 'limits']) {
    for (const resource of ['cpu', 'memory']) {
      if (container.resources?.[kind]?.[resource] === undefined) problems.push(`no ${kind}.${resource}`);
    }
    // The API server's rule: a standard resource, or a domain-qualified one.
    for (const resource of Object.keys(container.resources?.[kind] ?? {})) {
      if (!kStandardResources.includes(resource) && !resource.startsWith('hugepages-') && !resource.includes('/')) {
        problems.push(`${kind}.${resource} is not a resource name`);
      }
    }
  }
  if (workload.role === 'coordinator') return problems;  // no compute threads
  const limit = container.resources?.limits?.cpu;
  const variable = settings.vars.get('MUONPS_THREADS');
  const field = variable?.source === 'env' ? variable.from.valueFrom?.resourceFieldRef : undefined;
  const threads = settings.args.get('threads') ?? variable?.value;
  if (threads === undefined) {
    problems.push('threads: set MUONPS_THREADS from the CPU limit (else muonps uses every core of the node)');
  } else if (!settings.args.has('threads') && field) {
    if (field.resource !== 'limits.cpu' || (field.containerName && field.containerName !== container.name)) {
      problems.push(`MUONPS_THREADS comes from ${JSON.stringify(field)}, not this container's limits.cpu`);
    }
  } else if (limit === undefined || Number(threads) !== Math.ceil(cpuCores(limit))) {
    problems.push(`threads ${threads}, but the CPU limit is ${limit}`);
  }
  return problems;
}

function securityProblems(workload) {
  const problems = [];
  const pod = workload.pod.securityContext ?? {};
  if (workload.pod.enableServiceLinks !== false) {
    problems.push('enableServiceLinks is not false: service links put MUONPS_<SERVICE>_PORT variables where muonps reads its settings');
  }
  for (const container of workload.pod.containers ?? []) {
    const own = container.securityContext ?? {};
    const effective = (key) => own[key] ?? pod[key];
    const name = `container ${container.name}`;
    if (effective('runAsNonRoot') !== true) problems.push(`${name}: runAsNonRoot is not true`);
    if (effective('runAsUser') !== kUser) problems.push(`${name}: runAsUser is not ${kUser} (the image's user)`);
    if (own.readOnlyRootFilesystem !== true) problems.push(`${name}: readOnlyRootFilesystem is not true`);
    if (own.allowPrivilegeEscalation !== false) problems.push(`${name}: allowPrivilegeEscalation is not false`);
    if (!(own.capabilities?.drop ?? []).includes('ALL')) problems.push(`${name}: capabilities do not drop ALL`);
    if (own.capabilities?.add?.length) problems.push(`${name}: adds capabilities ${own.capabilities.add}`);
    if (effective('seccompProfile')?.type !== 'RuntimeDefault') problems.push(`${name}: seccompProfile is not RuntimeDefault`);
    const tmp = (container.volumeMounts ?? []).find((m) => m.mountPath === '/tmp');
    const volume = workload.pod.volumes?.find((v) => v.name === tmp?.name);
    if (!volume?.emptyDir) problems.push(`${name}: /tmp is not an emptyDir (the root filesystem is read-only)`);
  }
  return problems;
}

function labelProblems(workload) {
  const problems = [];
  const expected = { 'app.kubernetes.io/name': 'muonps', 'app.kubernetes.io/component': workload.role };
  for (const [key, value] of Object.entries(expected)) {
    if (workload.podLabels[key] !== value) problems.push(`pod label ${key} is ${workload.podLabels[key]}, not ${value}`);
  }
  if (!matches(workload.object.spec.selector, workload.podLabels)) problems.push('spec.selector does not select the pod template');
  return problems;
}

function mountProblems(workload) {
  const claims = (workload.object.spec.volumeClaimTemplates ?? []).map((t) => t.metadata?.name);
  const volumes = [...(workload.pod.volumes ?? []).map((v) => v.name), ...claims];
  const problems = [];
  for (const container of workload.pod.containers ?? []) {
    for (const mount of container.volumeMounts ?? []) {
      if (!volumes.includes(mount.name)) problems.push(`${container.name} mounts ${mount.name}, which is no volume`);
    }
  }
  for (const claim of claims) {
    const mounted = (workload.pod.containers ?? []).some((c) => (c.volumeMounts ?? []).some((m) => m.name === claim));
    if (!mounted) problems.push(`volumeClaimTemplate ${claim} is mounted nowhere`);
  }
  return problems;
}

// The coordinator a shard or worker dials must be the coordinator Service,
// at a Service port that leads to the coordinator's listen port.
function coordinatorAddressProblems(workload, settings, cluster) {
  const address = settings.get('coordinator');
  if (address === undefined) return ['--coordinator / MUONPS_COORDINATOR is not set (the default is 127.0.0.1:7070)'];
  const { host, port } = splitAddress(address);
  const serviceName = host.split('.')[0];
  const service = cluster.find('Service', serviceName);
  if (!service) return [`dials ${address}: no Service ${serviceName}`];
  const coordinators = cluster.selected(service.spec.selector).filter((w) => w.role === 'coordinator');
  if (coordinators.length === 0) return [`dials ${address}: Service ${serviceName} selects no coordinator pods`];
  const servicePort = (service.spec.ports ?? []).find((p) => p.port === port);
  if (!servicePort) return [`dials ${address}: Service ${serviceName} has no port ${port}`];
  const problems = [];
  for (const coordinator of coordinators) {
    const listen = splitAddress(new Settings(coordinator, cluster).get('listen') ?? '').port;
    const target = coordinator.containerPort(servicePort.targetPort ?? servicePort.port);
    if (target !== listen) {
      problems.push(`dials ${address}: the Service sends port ${port} to ${target}, the coordinator listens on ${listen}`);
    }
  }
  return problems;
}

function minShardsProblems(settings, cluster) {
  const shards = cluster.workloads.filter((w) => w.role === 'shard');
  const replicas = shards.reduce((sum, w) => sum + w.replicas, 0);
  const minShards = Number(settings.get('min_shards') ?? 1);
  return minShards === replicas ? [] : [`MUONPS_MIN_SHARDS is ${minShards}, the shards have ${replicas} replicas`];
}

// MUONPS_ADVERTISE = $(POD_NAME).<serviceName>[.$(POD_NAMESPACE)...]:<listen
// port>, POD_NAME and POD_NAMESPACE from the downward API, <serviceName> a
// headless Service that selects the shards and publishes them before they
// are ready (a shard turns ready only after the coordinator has its address).
function advertiseProblems(workload, settings, cluster) {
  const problems = [];
  if (workload.kind !== 'StatefulSet') return ['shards are not a StatefulSet: no stable pod names to advertise'];
  const entry = settings.vars.get('MUONPS_ADVERTISE');
  const raw = settings.args.get('advertise') ?? (entry?.source === 'env' ? entry.from.value : entry?.value);
  if (raw === undefined) return ['--advertise / MUONPS_ADVERTISE is not set (the default, the bound 0.0.0.0 address, is unreachable)'];
  const { host, port } = splitAddress(raw);
  const labels = host.split('.');
  const fieldOf = (label) => {
    const name = label.match(/^\$\(([A-Za-z_][A-Za-z0-9_]*)\)$/)?.[1];
    const source = name && settings.vars.get(name);
    return source?.source === 'env' ? source.from.valueFrom?.fieldRef?.fieldPath : undefined;
  };
  if (fieldOf(labels[0]) !== 'metadata.name') problems.push(`advertise host ${host} does not start with $(VAR) of the pod's metadata.name`);
  if (labels.length > 2 && fieldOf(labels[2]) !== 'metadata.namespace') {
    problems.push(`advertise host ${host}: third label is not $(VAR) of the pod's metadata.namespace`);
  }
  const serviceName = workload.object.spec.serviceName;
  if (labels[1] !== serviceName) problems.push(`advertise host ${host} is not under serviceName ${serviceName}`);
  const listen = splitAddress(settings.get('listen') ?? '').port;
  if (port !== listen) problems.push(`advertises port ${port}, listens on ${listen}`);
  const service = cluster.find('Service', serviceName);
  if (!service) {
    problems.push(`serviceName ${serviceName}: no such Service`);
  } else {
    if (service.spec.clusterIP !== 'None') problems.push(`Service ${serviceName} is not headless (clusterIP: None)`);
    if (service.spec.publishNotReadyAddresses !== true) {
      problems.push(`Service ${serviceName} does not publishNotReadyAddresses: shard names would not resolve until ready`);
    }
    if (!cluster.selected(service.spec.selector).includes(workload)) problems.push(`Service ${serviceName} does not select the shards`);
    if (!(service.spec.ports ?? []).some((p) => p.port === listen)) problems.push(`Service ${serviceName} has no port ${listen}`);
  }
  return problems;
}

function checkpointProblems(cluster) {
  const users = cluster.workloads.filter((w) => w.role === 'coordinator' || w.role === 'shard');
  const mounts = users.map((w) => {
    const mount = (w.container.volumeMounts ?? []).find((m) => m.mountPath === '/checkpoints');
    const volume = w.pod.volumes?.find((v) => v.name === mount?.name);
    return { workload: w.name, claim: volume?.persistentVolumeClaim?.claimName };
  });
  const problems = mounts.filter((m) => !m.claim).map((m) => `${m.workload} mounts no PersistentVolumeClaim at /checkpoints`);
  const claims = new Set(mounts.map((m) => m.claim).filter(Boolean));
  if (claims.size > 1) problems.push(`different claims at /checkpoints: ${[...claims].join(', ')}`);
  for (const claim of claims) {
    const pvc = cluster.find('PersistentVolumeClaim', claim);
    if (!pvc) problems.push(`no PersistentVolumeClaim ${claim}`);
    else if (!(pvc.spec.accessModes ?? []).includes('ReadWriteMany')) problems.push(`${claim} is not ReadWriteMany`);
  }
  return problems;
}

function serviceProblems(service, cluster) {
  const selected = cluster.selected(service.spec.selector);
  if (selected.length === 0) return ['selects no pods'];
  const problems = [];
  for (const port of service.spec.ports ?? []) {
    for (const workload of selected) {
      if (workload.containerPort(port.targetPort ?? port.port) === undefined) {
        problems.push(`port ${port.name ?? port.port}: ${workload.name} has no containerPort ${port.targetPort ?? port.port}`);
      }
    }
  }
  return problems;
}

function budgetSelectionProblems(budget, cluster) {
  const selected = cluster.selected(budget.spec.selector);
  return selected.length === 1 ? [] : [`selects ${selected.length} workloads: ${selected.map((w) => w.name).join(', ')}`];
}

// The coordinator and the shards hold a running job's state in memory.
function budgetProblems(cluster) {
  const problems = [];
  for (const workload of cluster.workloads.filter((w) => w.role === 'coordinator' || w.role === 'shard')) {
    const budgets = cluster.byKind('PodDisruptionBudget').filter((b) => cluster.selected(b.spec.selector).includes(workload));
    const strict = budgets.some((b) => b.spec.maxUnavailable === 0 || b.spec.minAvailable === workload.replicas ||
      b.spec.minAvailable === '100%');
    if (!strict) problems.push(`${workload.name}: no budget with maxUnavailable 0 or minAvailable ${workload.replicas}`);
  }
  return problems;
}

function podMonitorProblems(monitor, cluster) {
  const problems = [];
  if (monitor.spec.namespaceSelector) problems.push('has a namespaceSelector: the pods are in its own namespace');
  const selected = cluster.selected(monitor.spec.selector);
  for (const workload of cluster.workloads.filter((w) => isRole(w.role))) {
    if (!selected.includes(workload)) problems.push(`does not select ${workload.name}`);
  }
  for (const endpoint of monitor.spec.podMetricsEndpoints ?? []) {
    if (!endpoint.port) problems.push('an endpoint names no port');
    for (const workload of selected) {
      if (workload.containerPort(endpoint.port) === undefined) problems.push(`${workload.name} has no port "${endpoint.port}"`);
      const path = workload.annotations['prometheus.io/path'];
      if ((endpoint.path ?? '/metrics') !== path) problems.push(`path ${endpoint.path} but ${workload.name} says ${path}`);
    }
  }
  return problems;
}
