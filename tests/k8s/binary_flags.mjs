// What the muonps binary accepts, read from the binary itself rather than
// from a copy that could drift: its commands (the usage text), its flags
// (--helpfull), and which MUONPS_* environment variables it really reads.
//
// muonps turns a variable MUONPS_<FLAG> into --flag only for the flags of its
// environment list, so a variable naming a real flag may still be ignored.
// absl's --helpfull prints "currently: VALUE" for a flag whose value differs
// from its default: run with the variables set, it shows which ones took.

import { spawnSync } from 'node:child_process';

const kRoles = ['coordinator', 'shard', 'worker'];
const kClientCommands = ['submit', 'watch', 'list', 'status', 'cancel'];
// Variables muonps reads with getenv() where its flag is 0, not through its
// environment list, so --helpfull cannot show them taking (cli/main.cc,
// ApplyThreads). Accepted while the flag's help still names the variable.
const kReadDirectly = new Set(['MUONPS_THREADS']);

export class MuonpsBinary {
  constructor(binary) {
    this.binary = binary;
    const text = this.helpfull({}).output;
    this.flags = parseFlags(text);  // name -> {help, defaultValue}
    if (this.flags.size === 0) {
      throw new Error(`${binary} --helpfull listed no flags:\n${text}`);
    }
    // "muonps shard [--coordinator HOST:PORT] ..." -> shard: flags of its line.
    this.commands = new Map();
    for (const [, command, rest] of text.matchAll(/^\s*muonps ([a-z]+)\b(.*)$/gm)) {
      this.commands.set(command, new Set([...rest.matchAll(/--([a-z0-9_]+)/g)].map((m) => m[1])));
    }
  }

  // Runs `muonps --helpfull` with only PATH and `env` in the environment.
  helpfull(env) {
    const run = spawnSync(this.binary, ['--helpfull'], {
      env: { PATH: process.env.PATH, ...env },
      encoding: 'utf8',
    });
    if (run.error) throw new Error(`cannot run ${this.binary}: ${run.error.message}`);
    return { output: `${run.stdout}${run.stderr}`, stderr: run.stderr };
  }

  hasCommand(command) {
    return this.commands.has(command);
  }

  // Why flag `name` is not one to give `command`, or null when it is: it
  // exists, and its help names no other command as its user ("Coordinator:
  // ...", "local: ...", "worker (...): ...", "Client commands: ...",
  // "coordinator, shard: ...") unless the command's own usage line lists it.
  flagProblem(name, command) {
    const flag = this.flags.get(name);
    if (!flag) return `--${name} is not a flag of muonps`;
    if (this.commands.get(command)?.has(name)) return null;
    const scope = flag.help.match(/^([A-Za-z][A-Za-z ]*?(?:, [A-Za-z][A-Za-z ]*?)*)(?: \([^)]*\))?: /);
    if (!scope) return null;
    const users = scope[1].toLowerCase().split(', ')
      .flatMap((user) => (user === 'client commands' ? kClientCommands : [user]));
    // Help that opens with something else ("OpenBLAS kernel family: ...").
    if (!users.every((user) => this.commands.has(user))) return null;
    if (users.includes(command)) return null;
    return `--${name} is for ${users.join('/')} ("${flag.help}"), not for muonps ${command}`;
  }

  // The job `muonps defaults` prints, or {error} when it cannot be read.
  defaultJob() {
    if (this.job === undefined) {
      const run = spawnSync(this.binary, ['defaults'], { env: { PATH: process.env.PATH }, encoding: 'utf8' });
      try {
        if (run.error || run.status !== 0) throw new Error(run.error?.message ?? run.stderr.trim());
        this.job = JSON.parse(run.stdout);
      } catch (error) {
        this.job = { error: `muonps defaults: ${error.message}` };
      }
    }
    return this.job;
  }

  // For variables `vars` (Map name -> sample value, names MUONPS_*), returns
  // Map name -> problem for each one muonps rejects or does not read; the
  // others each set the flag of their name.
  environmentProblems(vars) {
    const problems = new Map();
    // The sample values must parse ("ERROR: Illegal value 'x' specified for
    // flag 'min_shards'").
    const asGiven = this.helpfull(Object.fromEntries(vars)).stderr;
    for (const [, value, flag] of asGiven.matchAll(/ERROR: Illegal value '([^']*)' specified for flag '([^']+)'/g)) {
      problems.set(envName(flag), `--${flag} rejects the value '${value}'`);
    }
    // Then each must change its flag: set to a value unlike its default.
    const probes = new Map();
    for (const name of vars.keys()) {
      const flagName = name.replace(/^MUONPS_/, '').toLowerCase();
      const flag = this.flags.get(flagName);
      if (!flag) {
        problems.set(name, `${name} names no flag of muonps (no --${flagName})`);
      } else if (!problems.has(name)) {
        probes.set(name, { flagName, value: unlike(flag.defaultValue) });
      }
    }
    const shown = parseFlags(this.helpfull(
      Object.fromEntries([...probes].map(([name, probe]) => [name, probe.value]))).output);
    for (const [name, { flagName, value }] of probes) {
      const flag = shown.get(flagName);
      if (flag.currentValue !== undefined && sameValue(flag.currentValue, value)) continue;
      if (kReadDirectly.has(name) && flag.help.includes(name)) continue;
      problems.set(name, `${name} names --${flagName}, but muonps does not read it from the environment`);
    }
    return problems;
  }
}

export function isRole(command) {
  return kRoles.includes(command);
}

// MUONPS_<FLAG upper-cased>.
export function envName(flag) {
  return `MUONPS_${flag.toUpperCase()}`;
}

// "--listen (host:port to serve on ...); default: ""; currently: "0.0.0.0:1";"
// -> listen: {help, defaultValue, currentValue}, quotes removed.
function parseFlags(text) {
  const flags = new Map();
  const flat = text.replace(/\s+/g, ' ');
  const entry = /--([A-Za-z0-9_]+) \((.*?)\); default: (.*?);(?: currently: (.*?);)?/g;
  for (const [, name, help, defaultValue, currentValue] of flat.matchAll(entry)) {
    flags.set(name, { help, defaultValue: unquote(defaultValue), currentValue: currentValue && unquote(currentValue) });
  }
  return flags;
}

function unquote(value) {
  return value.length >= 2 && value.startsWith('"') && value.endsWith('"') ? value.slice(1, -1) : value;
}

function isNumber(value) {
  return value.trim() !== '' && Number.isFinite(Number(value));
}

// A value of the type of `defaultValue` (bool, number, string) unlike it.
function unlike(defaultValue) {
  if (defaultValue === 'true' || defaultValue === 'false') return defaultValue === 'true' ? 'false' : 'true';
  if (isNumber(defaultValue)) return String(Number(defaultValue) + 7);
  return `${defaultValue}probe`;
}

function sameValue(a, b) {
  return isNumber(a) && isNumber(b) ? Number(a) === Number(b) : a === b;
}
