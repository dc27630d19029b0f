// Checks that one rendered set of manifests agrees with the muonps binary and
// with itself: what `kubectl apply` accepts but a running cluster would not.
//
// checkContract(objects, muonps, {requireTls}) returns [[check name,
// [problem, ...]], ...]; a check passes when its list is empty. With
// requireTls (the TLS variant), every role must speak mutual TLS.

import { envName, isRole } from './binary_flags.mjs';

const kUser = 65532;
const kWildcardHosts = ['0.0.0.0', '::', '[::]', ''];
const kStandardResources = ['cpu', 'memory', 'ephemeral-storage'];

// The Secrets the manifests reference and README.md tells how to create.
export const kClusterSecret = { secret: 'muonps-cluster-secret', key: 'secret' };
export const kUserTokens = { secret: 'muonps-user-tokens', key: 'tokens' };
// The labels a NetworkPolicy admits: client pods to the coordinator's gRPC
// port, Prometheus (any namespace) to every metrics port.
export const kClientLabels = { 'app.kubernetes.io/name': 'muonps-client' };
export const kPrometheusLabels = { 'app.kubernetes.io/name': 'prometheus' };
const kUnrelatedLabels = { 'app.kubernetes.io/name': 'unrelated' };
// Which roles dial which: the gRPC port of each role must admit these.
const kDialledBy = { coordinator: ['shard', 'worker'], shard: ['coordinator', 'worker'], worker: [] };
const kTlsFlags = ['tls_cert', 'tls_key', 'tls_ca'];
// The keys of a cert-manager (or kubernetes.io/tls) Secret.
const kTlsKeys = { tls_cert: 'tls.crt', tls_key: 'tls.key', tls_ca: 'ca.crt' };

export function checkContract(objects, muonps, { requireTls = false } = {}) {
  const cluster = new Cluster(objects);
  const defaultJob = muonps.defaultJob();
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
    add(`${label}: listen port = containerPort "grpc" = probe ports (gRPC; TCP under mutual TLS)`,
      listenProblems(workload, settings));
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
    add(`${label}: --cluster_secret_file from Secret ${kClusterSecret.secret} (key ${kClusterSecret.key})`,
      secretFlagProblems(workload, settings, 'cluster_secret_file', kClusterSecret));
    if (workload.role === 'coordinator') {
      add(`${label}: --tokens_file from Secret ${kUserTokens.secret} (key ${kUserTokens.key})`,
        secretFlagProblems(workload, settings, 'tokens_file', kUserTokens));
    }
    if (workload.role === 'coordinator' || workload.role === 'shard') {
      add(`${label}: --checkpoint_root = the checkpoint volume's mount path`, checkpointRootProblems(workload, settings));
    }
    if (workload.role === 'worker') {
      add(`${label}: --data_root covers the default job's data and the data volumes`,
        dataRootProblems(workload, settings, defaultJob));
    }
    add(`${label}: TLS cert, key and CA from mounted Secrets${requireTls ? ' (this variant requires TLS)' : ''}`,
      tlsProblems(workload, settings, requireTls));
    add(`${label}: NetworkPolicies select it and admit only members, clients and Prometheus`,
      networkPolicyProblems(workload, cluster));
  }
  add('every role speaks TLS, or none', tlsAgreementProblems(cluster));
  add('a NetworkPolicy', cluster.byKind('NetworkPolicy').length > 0 ? [] : ['none: every pod may connect to every muonps port']);
  for (const policy of cluster.byKind('NetworkPolicy')) {
    add(`NetworkPolicy/${policy.metadata.name}: selects muonps pods, at ports they have`, policyObjectProblems(policy, cluster));
  }
  const certificates = cluster.byKind('Certificate').filter((c) => String(c.apiVersion).startsWith('cert-manager.io/'));
  for (const certificate of certificates) {
    add(`Certificate/${certificate.metadata.name}: its issuer is in the manifests`, issuerProblems(certificate, cluster));
  }
  if (certificates.length > 0) {
    for (const workload of cluster.workloads.filter((w) => isRole(w.role))) {
      add(`${workload.kind}/${workload.name}: its Certificate names what members dial`,
        certificateProblems(workload, cluster, certificates));
    }
    add('member certificates share one issuer (one CA)', oneIssuerProblems(cluster, certificates));
  }
  add('coordinator and shards share a ReadWriteMany checkpoint volume', checkpointProblems(cluster));
  for (const service of cluster.byKind('Service')) {
    add(`Service/${service.metadata.name}: selects pods, target ports exist`, serviceProblems(service, cluster));
  }
  for (const budget of cluster.byKind('PodDisruptionBudget')) {
    add(`PodDisruptionBudget/${budget.metadata.name}: selects one workload`, budgetSelectionProblems(budget, cluster));
  }
  add('shards have budgets allowing no disruption; the coordinator, a job store on a claim or one',
    budgetProblems(cluster));
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
    if (field === 'metadata.namespace') return workload.object.metadata?.namespace ?? 'muonps';
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

// Probes: gRPC health checks on the listen port; under mutual TLS, where the
// kubelet cannot present a client certificate, TCP connects to it.
function listenProblems(workload, settings) {
  const problems = [];
  const port = bindPort(settings, 'listen', problems);
  if (port === undefined) return problems;
  if (workload.containerPort('grpc') !== port) {
    problems.push(`containerPort "grpc" is ${workload.containerPort('grpc')}, muonps listens on ${port}`);
  }
  const tls = usesTls(settings);
  for (const kind of ['readinessProbe', 'livenessProbe', 'startupProbe']) {
    const probe = workload.container[kind];
    if (!probe) {
      if (kind !== 'startupProbe') problems.push(`no ${kind}`);
      continue;
    }
    if (tls) {
      if (!probe.tcpSocket) {
        problems.push(`${kind} is not a TCP probe (tcpSocket): under mutual TLS the kubelet's ` +
          `${probe.grpc ? 'gRPC probe' : 'probe'} has no client certificate`);
        continue;
      }
      const probed = typeof probe.tcpSocket.port === 'string'
        ? workload.containerPort(probe.tcpSocket.port) : probe.tcpSocket.port;
      if (probed !== port) problems.push(`${kind} connects to port ${probe.tcpSocket.port}, muonps listens on ${port}`);
    } else if (!probe.grpc) {
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
// Whether the workload's --state_dir (the coordinator's job store) lies on
// a PersistentVolumeClaim mount, so that a replaced pod finds its jobs.
function stateOnClaim(workload, cluster) {
  const dir = new Settings(workload, cluster).get('state_dir');
  if (!dir) return false;
  const mount = (workload.container.volumeMounts ?? [])
    .filter((m) => dir === m.mountPath || dir.startsWith(`${m.mountPath.replace(/\/+$/, '')}/`))
    .sort((a, b) => b.mountPath.length - a.mountPath.length)[0];
  const volume = mount && (workload.pod.volumes ?? []).find((v) => v.name === mount.name);
  return Boolean(volume?.persistentVolumeClaim);
}

// An evicted shard costs the steps since the last checkpoint: shards need a
// budget that allows no disruption. A coordinator with its job store on a
// claim continues its job when replaced; without, it needs one too.
function budgetProblems(cluster) {
  const problems = [];
  for (const workload of cluster.workloads.filter((w) => w.role === 'coordinator' || w.role === 'shard')) {
    if (workload.role === 'coordinator' && stateOnClaim(workload, cluster)) continue;
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

// --- Secrets, roots, TLS -----------------------------------------------------

// Where file `file` of the workload's container comes from: {secret, key,
// optional} when from a Secret volume, else {problem}.
function secretFile(workload, file) {
  const mounts = (workload.container.volumeMounts ?? [])
    .filter((m) => file === m.mountPath || file.startsWith(`${m.mountPath.replace(/\/+$/, '')}/`))
    .sort((a, b) => b.mountPath.length - a.mountPath.length);
  const mount = mounts[0];
  if (!mount) return { problem: `${file} is on no volume mount` };
  const volume = (workload.pod.volumes ?? []).find((v) => v.name === mount.name);
  if (!volume) return { problem: `${file} is on mount ${mount.name}, which is no volume` };
  if (!volume.secret) return { problem: `${file} is on volume ${mount.name}, not a Secret volume` };
  let relative = file === mount.mountPath ? '' : file.slice(mount.mountPath.replace(/\/+$/, '').length + 1);
  if (mount.subPath) {
    if (relative !== '') return { problem: `${file} is under a subPath mount of a file` };
    relative = mount.subPath;
  }
  if (relative === '') return { problem: `${file} is the mount ${mount.name} itself, not a file in it` };
  let key = relative;
  if (volume.secret.items) {
    const item = volume.secret.items.find((i) => i.path === relative);
    if (!item) return { problem: `Secret volume ${mount.name} projects no item at ${relative}` };
    key = item.key;
  }
  return { secret: volume.secret.secretName, key, optional: volume.secret.optional === true };
}

// --flag (an argument; or its variable) names a file of Secret `expected`.
function secretFlagProblems(workload, settings, flag, expected) {
  const file = settings.get(flag);
  if (file === undefined || file === '') return [`--${flag} is not set`];
  const source = secretFile(workload, file);
  if (source.problem) return [`--${flag}=${file}: ${source.problem}`];
  const problems = [];
  if (source.secret !== expected.secret || source.key !== expected.key) {
    problems.push(`--${flag}=${file} is key ${source.key} of Secret ${source.secret}, not key ${expected.key} of ${expected.secret}`);
  }
  if (source.optional) problems.push(`the Secret volume of --${flag} is optional: the pod would start without it`);
  return problems;
}

function normalizedPath(path) {
  return path.length > 1 ? path.replace(/\/+$/, '') : path;
}

function isUnder(path, root) {
  const p = normalizedPath(path);
  const r = normalizedPath(root);
  return p === r || p.startsWith(r === '/' ? '/' : `${r}/`);
}

// The checkpoint root is where the shared checkpoint claim is mounted,
// writable.
function checkpointRootProblems(workload, settings) {
  const root = settings.get('checkpoint_root');
  if (root === undefined || root === '') {
    return ['--checkpoint_root is not set: jobs could neither checkpoint nor resume'];
  }
  const mount = (workload.container.volumeMounts ?? []).find((m) => normalizedPath(m.mountPath) === normalizedPath(root));
  if (!mount) return [`--checkpoint_root=${root} is no volume mount's path`];
  const volume = (workload.pod.volumes ?? []).find((v) => v.name === mount.name);
  const problems = [];
  if (!volume?.persistentVolumeClaim) problems.push(`--checkpoint_root=${root} is volume ${mount.name}, not the checkpoint claim`);
  if (mount.readOnly) problems.push(`--checkpoint_root=${root} is mounted read-only`);
  return problems;
}

// Jobs read data under --data_root: the default job's data.path must be
// under one, and so must every data volume (any but scratch, Secrets and
// ConfigMaps) the workers mount.
function dataRootProblems(workload, settings, defaultJob) {
  const value = settings.get('data_root');
  if (value === undefined || value === '') return ['--data_root is not set: every job with a data.path would be refused'];
  const roots = value.split(',').filter((root) => root !== '');
  const problems = roots.filter((root) => !root.startsWith('/')).map((root) => `data root ${root} is not an absolute path`);
  if (defaultJob.error) problems.push(`cannot read the default job: ${defaultJob.error}`);
  const corpus = defaultJob.data?.path;
  if (corpus && !roots.some((root) => isUnder(corpus, root))) {
    problems.push(`the default job's data.path ${corpus} (muonps defaults) is under no --data_root`);
  }
  for (const mount of workload.container.volumeMounts ?? []) {
    const volume = (workload.pod.volumes ?? []).find((v) => v.name === mount.name);
    if (!volume || volume.emptyDir || volume.secret || volume.configMap || volume.downwardAPI || volume.projected) continue;
    if (!roots.some((root) => isUnder(mount.mountPath, root))) {
      problems.push(`data volume ${mount.name} at ${mount.mountPath} is under no --data_root`);
    }
  }
  return problems;
}

function usesTls(settings) {
  return kTlsFlags.some((flag) => (settings.get(flag) ?? '') !== '');
}

// The three TLS files, all or none (all when required), each from a mounted
// Secret; the certificate and its key from the same one.
function tlsProblems(workload, settings, requireTls) {
  const given = kTlsFlags.filter((flag) => (settings.get(flag) ?? '') !== '');
  if (given.length === 0) {
    return requireTls ? [`no TLS: set ${kTlsFlags.map(envName).join(', ')}`] : [];
  }
  const problems = kTlsFlags.filter((flag) => !given.includes(flag))
    .map((flag) => `${envName(flag)} is not set: muonps needs ${kTlsFlags.map(envName).join(', ')} together`);
  const sources = {};
  for (const flag of given) {
    const source = secretFile(workload, settings.get(flag));
    if (source.problem) problems.push(`${envName(flag)}: ${source.problem}`);
    else sources[flag] = source;
  }
  if (sources.tls_cert && sources.tls_key && sources.tls_cert.secret !== sources.tls_key.secret) {
    problems.push(`the certificate is in Secret ${sources.tls_cert.secret}, its key in ${sources.tls_key.secret}`);
  }
  return problems;
}

function tlsAgreementProblems(cluster) {
  const roles = cluster.workloads.filter((w) => isRole(w.role));
  const secured = roles.filter((w) => usesTls(new Settings(w, cluster)));
  if (secured.length === 0 || secured.length === roles.length) return [];
  return [`${secured.map((w) => w.name).join(', ')} speak TLS, ` +
    `${roles.filter((w) => !secured.includes(w)).map((w) => w.name).join(', ')} do not: they cannot talk`];
}

// --- NetworkPolicies ---------------------------------------------------------

// A NetworkPolicy's podSelector: empty selects every pod of the namespace.
function policySelects(policy, labels) {
  const selector = policy.spec?.podSelector ?? {};
  const empty = Object.keys(selector.matchLabels ?? {}).length === 0 && (selector.matchExpressions ?? []).length === 0;
  return empty || matches(selector, labels);
}

function ingressPolicies(cluster, workload) {
  return cluster.byKind('NetworkPolicy').filter((policy) => {
    const types = policy.spec?.policyTypes;
    return (types === undefined || types.includes('Ingress')) && policySelects(policy, workload.podLabels);
  });
}

// The container ports (numbers) a rule's `ports` admit on `workload`; null:
// every port.
function rulePorts(rule, workload, problems) {
  if (!rule.ports || rule.ports.length === 0) return null;
  const ports = [];
  for (const entry of rule.ports) {
    if (entry.port === undefined) return null;
    const port = typeof entry.port === 'string' ? workload.containerPort(entry.port) : entry.port;
    if (port === undefined) problems.push(`a rule names port "${entry.port}", which ${workload.name} does not have`);
    else ports.push(port);
  }
  return ports;
}

// Whether a `from` peer admits pods labelled `labels`: in this namespace
// (inNamespace) or in another.
function peerAdmits(peer, labels, inNamespace) {
  if (peer.ipBlock) return false;
  if (!peer.namespaceSelector && !inNamespace) return false;
  if (peer.namespaceSelector) {
    const selector = peer.namespaceSelector;
    const everyNamespace = Object.keys(selector.matchLabels ?? {}).length === 0 && (selector.matchExpressions ?? []).length === 0;
    if (!everyNamespace && !inNamespace) return false;  // named namespaces: assume not these
  }
  return peer.podSelector === undefined || policySelects({ spec: { podSelector: peer.podSelector } }, labels);
}

function networkPolicyProblems(workload, cluster) {
  const policies = ingressPolicies(cluster, workload);
  if (policies.length === 0) return [`no NetworkPolicy selects ${workload.name}: any pod may connect to it`];
  const problems = [];
  const grpc = workload.containerPort('grpc');
  const metrics = workload.containerPort('metrics');
  const rules = policies.flatMap((policy) => (policy.spec.ingress ?? []).map((rule) => ({ policy, rule })));
  const admitted = rules.map(({ policy, rule }) => ({ policy, rule, ports: rulePorts(rule, workload, problems) }));
  // Who may reach `port`: some rule admits its port and a peer that admits.
  const admits = (port, labels, inNamespace) => admitted.some(({ rule, ports }) =>
    (ports === null || ports.includes(port)) &&
    (!rule.from || rule.from.length === 0 || rule.from.some((peer) => peerAdmits(peer, labels, inNamespace))));
  for (const { policy, rule, ports } of admitted) {
    const where = `NetworkPolicy ${policy.metadata.name}`;
    if (ports === null) problems.push(`${where} admits every port of ${workload.name}`);
    for (const port of ports ?? []) {
      if (port !== grpc && port !== metrics) problems.push(`${where} admits port ${port}, neither "grpc" nor "metrics"`);
    }
    if (!rule.from || rule.from.length === 0) {
      problems.push(`${where} admits ${ports === null ? 'every port' : `port ${ports.join(', ')}`} from anywhere`);
      continue;
    }
    for (const peer of rule.from) {
      if (peer.ipBlock) problems.push(`${where} admits addresses ${peer.ipBlock.cidr}`);
      if (peer.namespaceSelector && !peer.podSelector) problems.push(`${where} admits every pod of the namespaces it selects`);
    }
  }
  for (const role of kDialledBy[workload.role] ?? []) {
    for (const source of cluster.workloads.filter((w) => w.role === role)) {
      if (!admits(grpc, source.podLabels, true)) problems.push(`does not admit ${source.name} (muonps ${role}) to its gRPC port ${grpc}`);
    }
  }
  const client = admits(grpc, kClientLabels, true);
  if (workload.role === 'coordinator' && !client) {
    problems.push(`does not admit clients (pods labelled ${JSON.stringify(kClientLabels)}) to its gRPC port ${grpc}`);
  }
  if (workload.role !== 'coordinator' && client) {
    problems.push(`admits clients (${JSON.stringify(kClientLabels)}) to its gRPC port: only the coordinator serves them`);
  }
  if (metrics !== undefined && !admits(metrics, kPrometheusLabels, false)) {
    problems.push(`does not admit Prometheus (pods labelled ${JSON.stringify(kPrometheusLabels)}, any namespace) to its metrics port ${metrics}`);
  }
  // Any other pod of the namespace: only the coordinator's clients may be.
  if (metrics !== undefined && admits(metrics, kUnrelatedLabels, true)) {
    problems.push(`admits any pod of the namespace to its metrics port ${metrics}`);
  }
  return problems;
}

function policyObjectProblems(policy, cluster) {
  const selected = cluster.workloads.filter((w) => isRole(w.role) && policySelects(policy, w.podLabels));
  if (selected.length === 0) return ['selects no muonps pod'];
  const problems = [];
  for (const rule of policy.spec.ingress ?? []) {
    for (const entry of rule.ports ?? []) {
      if (typeof entry.port !== 'string') continue;
      for (const workload of selected) {
        if (workload.containerPort(entry.port) === undefined) problems.push(`${workload.name} has no port "${entry.port}"`);
      }
    }
  }
  return problems;
}

// --- cert-manager --------------------------------------------------------------

// gRPC's check of a name against a certificate's DNS name: equal, or a
// wildcard "*.rest" for one label followed by "rest" (which has a dot).
function nameMatches(pattern, host) {
  const p = pattern.toLowerCase();
  const h = host.toLowerCase();
  if (p === h) return true;
  if (!p.startsWith('*.') || !p.slice(2).includes('.')) return false;
  const dot = h.indexOf('.');
  return dot > 0 && h.slice(dot + 1) === p.slice(2);
}

function issuerProblems(certificate, cluster) {
  const ref = certificate.spec?.issuerRef ?? {};
  if (!ref.name) return ['no issuerRef.name'];
  if (ref.kind === 'ClusterIssuer' || (ref.group && ref.group !== 'cert-manager.io')) return [];
  const issuer = cluster.objects.find((o) => o.kind === 'Issuer' && o.metadata?.name === ref.name &&
    String(o.apiVersion).startsWith('cert-manager.io/'));
  if (!issuer) return [`issuerRef names Issuer ${ref.name}, which is not in the manifests`];
  const caSecret = issuer.spec?.ca?.secretName;
  if (caSecret) {
    const ca = cluster.byKind('Certificate').find((c) => c.spec?.secretName === caSecret);
    if (ca && ca.spec.isCA !== true) return [`Issuer ${ref.name} signs with Secret ${caSecret}, whose Certificate is not isCA`];
  }
  return [];
}

// The hosts other members dial to reach `workload`: the coordinator at
// --coordinator, a shard at its advertised name.
function dialledHosts(workload, cluster) {
  if (workload.role === 'coordinator') {
    const hosts = new Set();
    for (const member of cluster.workloads.filter((w) => w.role === 'shard' || w.role === 'worker')) {
      const address = new Settings(member, cluster).get('coordinator');
      if (address) hosts.add(splitAddress(address).host);
    }
    return [...hosts];
  }
  if (workload.role === 'shard') {
    const address = new Settings(workload, cluster).get('advertise');
    return address ? [splitAddress(address).host] : [];
  }
  return [];
}

// The Certificate that writes the Secret a role's --tls_cert comes from
// must name every host members dial to reach it, and allow server and
// client use.
function certificateProblems(workload, cluster, certificates) {
  const settings = new Settings(workload, cluster);
  if (!usesTls(settings)) return [];
  const problems = [];
  let secretName;
  for (const flag of kTlsFlags) {
    const file = settings.get(flag);
    if (!file) continue;
    const source = secretFile(workload, file);
    if (source.problem) continue;  // tlsProblems reports it
    if (source.key !== kTlsKeys[flag]) {
      problems.push(`${envName(flag)} is key ${source.key} of Secret ${source.secret}; cert-manager writes ${kTlsKeys[flag]}`);
    }
    if (flag === 'tls_cert') secretName = source.secret;
  }
  if (!secretName) return problems;
  const certificate = certificates.find((c) => c.spec?.secretName === secretName);
  if (!certificate) return [...problems, `no Certificate writes Secret ${secretName}`];
  const names = certificate.spec.dnsNames ?? [];
  for (const host of dialledHosts(workload, cluster)) {
    if (!names.some((name) => nameMatches(name, host))) {
      problems.push(`Certificate ${certificate.metadata.name} does not name ${host}, which members dial (dnsNames: ${JSON.stringify(names)})`);
    }
  }
  const usages = certificate.spec.usages;
  if (usages) {
    for (const usage of ['server auth', 'client auth']) {
      if (!usages.includes(usage)) problems.push(`Certificate ${certificate.metadata.name} lacks usage "${usage}": members both serve and dial`);
    }
  }
  if (certificate.spec.isCA) problems.push(`Certificate ${certificate.metadata.name} is a CA certificate`);
  return problems;
}

function oneIssuerProblems(cluster, certificates) {
  const issuers = new Set();
  for (const workload of cluster.workloads.filter((w) => isRole(w.role))) {
    const settings = new Settings(workload, cluster);
    const file = settings.get('tls_cert');
    if (!file) continue;
    const source = secretFile(workload, file);
    const certificate = certificates.find((c) => c.spec?.secretName === source.secret);
    if (certificate) issuers.add(`${certificate.spec.issuerRef?.kind ?? 'Issuer'}/${certificate.spec.issuerRef?.name}`);
  }
  return issuers.size <= 1 ? [] : [`member certificates come from ${[...issuers].join(', ')}: each must verify against every member's ca.crt`];
}
