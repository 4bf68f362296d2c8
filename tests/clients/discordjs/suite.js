#!/usr/bin/env node
// discord.js, unmodified, against `coven sim`.
//
// Only discord.js's base URL changes: the `rest.api` option of `Client`
// (`http://HOST:PORT/api`; @discordjs/rest adds `/v10`). The Gateway URL is the one
// `GET /gateway/bot` gives (@discordjs/ws `fetchGatewayInformation`), so there is nothing
// to set for it. Everything else is the library as a bot developer gets it from npm,
// with its defaults, driven through its public API only.
//
// Usage: node suite.js --sim http://127.0.0.1:PORT --token TOKEN SCENARIO...
// (`--list` prints the scenarios). discord.js is found the usual way (a node_modules
// beside or above this file, or NODE_PATH, which tests/it/clients_js.rs sets to the one
// scripts/test.sh installs). Each scenario runs its checks with deadlines and prints one
// line per check (`PASS scenario: check` / `FAIL scenario: check: reason`) and a closing
// `RESULT scenario passed|failed` line; the exit status is 0 only if every scenario
// passed. discord.js's own debug log goes to stderr.

'use strict';

const {
  Client,
  ChannelType,
  Events,
  GatewayIntentBits,
  PermissionFlagsBits,
  RESTEvents,
  version,
} = require('discord.js');

// How long any one condition may take before its check fails (ms).
const DEADLINE = 15_000;

class Failed extends Error {}

function expect(condition, message) {
  if (!condition) throw new Failed(message);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const log = (...parts) => process.stderr.write(`${new Date().toISOString()} ${parts.join(' ')}\n`);
const sorted = (items) => [...items].map(String).sort();
const show = (value) => JSON.stringify(value, (_, v) => (typeof v === 'bigint' ? v.toString() : v));

// ------------------------------------------------------------------------------------
// The simulator's control API.

class Sim {
  constructor(base) {
    this.base = base.replace(/\/+$/, '');
  }

  async call(method, path, body) {
    const res = await fetch(`${this.base}/_sim${path}`, {
      method,
      headers: body === undefined ? {} : { 'content-type': 'application/json' },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await res.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = text;
    }
    return [res.status, data];
  }

  async ok(method, path, body) {
    const [status, data] = await this.call(method, path, body);
    if (status < 200 || status >= 300) {
      throw new Failed(`control API ${method} /_sim${path} answered ${status}: ${show(data)}`);
    }
    return data;
  }

  state(guild) {
    return this.ok('GET', guild === undefined ? '/state' : `/state?guild=${guild}`);
  }

  async user(username) {
    const state = await this.state();
    const user = state.users.find((u) => u.username === username);
    if (!user) throw new Failed(`the simulator has no user ${username}`);
    return user.id;
  }

  voice(user, channel, flags = {}) {
    return this.ok('POST', '/voice', { user_id: user, channel_id: channel, ...flags });
  }

  // A user to move around voice, out of voice to begin with.
  async player(username) {
    const user = await this.user(username);
    const state = await this.state();
    if (state.voice_states.some((v) => v.user_id === user)) await this.voice(user, null);
    return user;
  }

  async voiceChannel(name) {
    return (await this.ok('POST', '/channels', { name, type: 2 })).id;
  }

  async gateway() {
    return (await this.state()).gateway;
  }

  fail(fault) {
    return this.ok('POST', '/rest/fail', fault);
  }
}

// ------------------------------------------------------------------------------------
// What a client's event listeners saw, in order, and waiting on it with deadlines.

// The events the suite notes. discord.js emits them synchronously as it handles each
// packet, so the order noted is the order they came in; what a listener is handed may be
// changed in place by later packets (a VoiceState is patched), so each is noted as a
// snapshot of what it said then.
const NOTED = {
  [Events.ClientReady]: () => [],
  [Events.ShardReady]: (id) => [id],
  [Events.ShardResume]: (id, replayed) => [id, replayed],
  [Events.ShardReconnecting]: (id) => [id],
  [Events.ShardDisconnect]: (event, id) => [event.code, id],
  [Events.ShardError]: (error, id) => [String(error), id],
  [Events.Error]: (error) => [String(error && error.stack ? error.stack : error)],
  [Events.GuildCreate]: (g) => [g.id],
  [Events.VoiceStateUpdate]: (before, after) => [
    {
      user: after.id,
      guild: after.guild.id,
      before: before.channelId ?? null,
      after: after.channelId ?? null,
      selfMute: [before.selfMute ?? null, after.selfMute ?? null],
      serverMute: after.serverMute ?? null,
      serverDeaf: after.serverDeaf ?? null,
    },
  ],
  [Events.ChannelCreate]: (c) => [snapshotChannel(c)],
  [Events.ChannelUpdate]: (_before, c) => [snapshotChannel(c)],
  [Events.ChannelDelete]: (c) => [{ id: c.id, name: c.name }],
  [Events.GuildRoleCreate]: (r) => [snapshotRole(r)],
  [Events.GuildRoleUpdate]: (_before, r) => [snapshotRole(r)],
  [Events.GuildRoleDelete]: (r) => [{ id: r.id }],
  [Events.GuildMemberUpdate]: (_before, m) => [{ id: m.id, nick: m.nickname, roles: sorted(m.roles.cache.keys()) }],
  // Every dispatch with the shard it came on (`raw` is emitted before discord.js acts on it).
  [Events.Raw]: (packet, shardId) => [packet.t, packet.d?.guild_id ?? null, shardId],
};

function snapshotChannel(c) {
  return {
    id: c.id,
    name: c.name,
    type: c.type,
    parentId: c.parentId ?? null,
    userLimit: c.userLimit ?? null,
    bitrate: c.bitrate ?? null,
    position: c.rawPosition ?? null,
    overwrites: overwritesOf(c),
  };
}

function overwritesOf(c) {
  const out = {};
  if (c.permissionOverwrites) {
    for (const [id, o] of c.permissionOverwrites.cache) {
      out[id] = [o.type, o.allow.bitfield.toString(), o.deny.bitfield.toString()];
    }
  }
  return out;
}

function snapshotRole(r) {
  return {
    id: r.id,
    name: r.name,
    permissions: r.permissions.bitfield.toString(),
    position: r.rawPosition,
    color: r.colors?.primaryColor ?? r.color,
  };
}

class Recorder {
  constructor(client) {
    this.events = [];
    this.waiters = new Set();
    for (const [name, snap] of Object.entries(NOTED)) {
      client.on(name, (...args) => this.add(name, snap(...args)));
    }
  }

  add(name, args) {
    this.events.push({ name, args });
    for (const waiter of this.waiters) waiter();
  }

  mark() {
    return this.events.length;
  }

  seen(name, since = 0) {
    return this.events.slice(since).filter((e) => e.name === name).map((e) => e.args);
  }

  summary(since = 0) {
    const names = this.events.slice(since).map((e) => e.name).filter((n) => n !== Events.Raw);
    return names.slice(-30).join(', ') || 'nothing';
  }

  // The first `name` event from `since` on whose arguments pass `check`.
  until(what, name, check = () => true, since = 0, timeout = DEADLINE) {
    return new Promise((resolve, reject) => {
      const look = () => {
        for (const e of this.events.slice(since)) {
          if (e.name === name && check(...e.args)) return e.args;
        }
        return null;
      };
      const found = look();
      if (found) {
        resolve(found);
        return;
      }
      const waiter = () => {
        const args = look();
        if (args) {
          done();
          resolve(args);
        }
      };
      const timer = setTimeout(() => {
        done();
        reject(new Failed(`no ${what} within ${timeout / 1000}s; events since: ${this.summary(since)}`));
      }, timeout);
      const done = () => {
        clearTimeout(timer);
        this.waiters.delete(waiter);
      };
      this.waiters.add(waiter);
    });
  }
}

// ------------------------------------------------------------------------------------
// One scenario's run: its checks' outcomes and the clients it started.

class Run {
  constructor(name, sim, simUrl, token) {
    this.name = name;
    this.sim = sim;
    this.simUrl = simUrl;
    this.token = token;
    this.results = [];
    this.clients = [];
  }

  // Runs one check; a failure is noted, not thrown, so later checks still run.
  async check(what, body, timeout = 60_000) {
    let timer;
    try {
      await Promise.race([
        body(),
        new Promise((_, reject) => {
          timer = setTimeout(
            () => reject(new Failed(`the check took longer than ${timeout / 1000}s`)),
            timeout,
          );
        }),
      ]);
    } catch (e) {
      const reason = e instanceof Failed ? e.message : `${e && e.stack ? e.stack : e}`;
      this.fail(what, reason);
      return false;
    } finally {
      clearTimeout(timer);
    }
    this.results.push([what, null]);
    console.log(`PASS ${this.name}: ${what}`);
    return true;
  }

  fail(what, reason) {
    this.results.push([what, reason]);
    console.log(`FAIL ${this.name}: ${what}: ${reason}`);
  }

  // A client pointed at the simulator: the one option a bot developer changes is
  // `rest.api`. Coven's intents (GUILD_MEMBERS is privileged and not granted).
  client(options = {}) {
    const client = new Client({
      intents: [GatewayIntentBits.Guilds, GatewayIntentBits.GuildVoiceStates],
      rest: { api: `${this.simUrl.replace(/\/+$/, '')}/api` },
      ...options,
    });
    client.rec = new Recorder(client);
    client.on(Events.Debug, (m) => log('debug', m));
    client.on(Events.Warn, (m) => log('warn', m));
    client.rest.on(RESTEvents.Debug, (m) => log('rest', m));
    this.clients.push(client);
    return client;
  }

  // A client logged in and ready (`clientReady`: every guild of READY has arrived).
  async ready(options) {
    const client = this.client(options);
    const ready = client.rec.until('clientReady', Events.ClientReady);
    await client.login(this.token);
    await ready;
    return client;
  }

  async close() {
    for (const client of this.clients) {
      try {
        await client.destroy();
      } catch (e) {
        log('closing a client:', String(e));
      }
    }
  }

  get passed() {
    return this.results.length > 0 && this.results.every(([, reason]) => reason === null);
  }
}

// ------------------------------------------------------------------------------------
// Scenarios.

// Client#login: READY, clientReady, the logged-in user and application, and the cache of
// every guild matching what the simulator holds.
async function loginAndCache(run) {
  const state = await run.sim.state();
  const client = run.client();

  const ok = await run.check('login: READY and clientReady', async () => {
    const ready = client.rec.until('clientReady', Events.ClientReady);
    await client.login(run.token);
    await ready;
    expect(client.user && client.user.id === state.bot_id, `logged in as ${client.user?.id}, the bot is ${state.bot_id}`);
    expect(client.user.bot, 'the bot user is not marked bot');
    expect(client.application?.id === state.client_id, `application ${client.application?.id}, the sim says ${state.client_id}`);
  });
  if (!ok) return;

  await run.check('the guilds the bot is in, with names and member counts', async () => {
    const want = sorted(state.guilds.filter((g) => g.bot && !g.unavailable).map((g) => g.id));
    const have = sorted(client.guilds.cache.keys());
    expect(show(have) === show(want), `guilds in the cache ${show(have)}, the bot is in ${show(want)}`);
    for (const g of state.guilds) {
      const guild = client.guilds.cache.get(g.id);
      if (!guild) continue;
      expect(guild.available, `${g.name} is not available`);
      expect(guild.name === g.name, `guild ${g.id} is ${show(guild.name)}, not ${show(g.name)}`);
      expect(guild.memberCount === g.members, `${g.name}: memberCount ${guild.memberCount}, the sim has ${g.members}`);
    }
  });

  for (const g of state.guilds.filter((g) => g.bot)) {
    const gstate = await run.sim.state(g.id);
    await run.check(`${g.name}: channels, overwrites and roles`, () => sameGuild(client, g.id, gstate));
    await run.check(`${g.name}: members, their roles and voice states`, () => sameMembers(client, g.id, gstate));
  }
}

async function sameGuild(client, gid, state) {
  const guild = client.guilds.cache.get(gid);
  expect(guild, `guild ${gid} not in the cache`);
  const want = {};
  for (const c of state.channels) {
    if (c.bot_can_view !== false) want[c.id] = [c.name, c.type, c.parent_id ?? null];
  }
  const have = {};
  for (const [id, c] of guild.channels.cache) have[id] = [c.name, c.type, c.parentId ?? null];
  expect(show(sortKeys(have)) === show(sortKeys(want)), `channels ${show(have)}\n  the sim has ${show(want)}`);
  for (const c of state.channels) {
    const channel = guild.channels.cache.get(c.id);
    if (!channel) continue;
    const wantOw = {};
    for (const o of c.permission_overwrites) wantOw[o.id] = [Number(o.type), String(o.allow), String(o.deny)];
    const haveOw = overwritesOf(channel);
    expect(show(sortKeys(haveOw)) === show(sortKeys(wantOw)), `${c.name}: overwrites ${show(haveOw)}, the sim has ${show(wantOw)}`);
    if (c.type === ChannelType.GuildVoice && c.user_limit !== null && c.user_limit !== undefined) {
      expect(channel.userLimit === c.user_limit, `${c.name}: userLimit ${channel.userLimit}, the sim has ${c.user_limit}`);
    }
  }
  const wantRoles = {};
  for (const r of state.roles) wantRoles[r.id] = [r.name, String(r.permissions), r.position, r.managed];
  const haveRoles = {};
  for (const [id, r] of guild.roles.cache) haveRoles[id] = [r.name, r.permissions.bitfield.toString(), r.rawPosition, r.managed];
  expect(show(sortKeys(haveRoles)) === show(sortKeys(wantRoles)), `roles ${show(haveRoles)}\n  the sim has ${show(wantRoles)}`);
  const managed = state.roles.find((r) => r.managed);
  if (managed) {
    // discord.js finds the bot's own role by tags.bot_id (RoleManager#botRoleFor).
    const botRole = guild.roles.botRoleFor(client.user);
    expect(botRole && botRole.id === managed.id, `botRoleFor(the bot) is ${botRole?.id}; the managed role is ${managed.id}`);
  }
}

function sortKeys(object) {
  return Object.fromEntries(Object.entries(object).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)));
}

async function sameMembers(client, gid, state) {
  const guild = client.guilds.cache.get(gid);
  expect(guild, `guild ${gid} not in the cache`);
  const me = guild.members.me;
  expect(me && me.id === state.bot_id, `guild.members.me is ${me?.id}`);
  for (const m of state.members) {
    // Without the (privileged) GUILD_MEMBERS intent discord.js caches only the bot and
    // whoever is in voice; everyone else is read through Get Guild Member.
    const member = await guild.members.fetch(m.user_id);
    const have = sorted([...member.roles.cache.keys()].filter((r) => r !== guild.id));
    const want = sorted(m.roles);
    expect(show(have) === show(want), `member ${m.user_id}: roles ${show(have)}, the sim has ${show(want)}`);
  }
  const wantVoice = {};
  for (const v of state.voice_states) wantVoice[v.user_id] = v.channel_id;
  const haveVoice = {};
  for (const [id, v] of guild.voiceStates.cache) if (v.channelId) haveVoice[id] = v.channelId;
  expect(show(sortKeys(haveVoice)) === show(sortKeys(wantVoice)), `voice states ${show(haveVoice)}, the sim has ${show(wantVoice)}`);
}

// A simulated player joins, moves and leaves through the control API: voiceStateUpdate
// with the right old and new channels each time, and the cache agreeing.
async function voiceUpdates(run) {
  const client = await run.ready();
  const state = await run.sim.state();
  const gid = state.guild_id;
  const lobby = state.lobby_id;
  const user = await run.sim.player('bramble');
  const rec = client.rec;
  let den;

  const made = await run.check('an admin makes a second voice channel: channelCreate', async () => {
    const mark = rec.mark();
    den = await run.sim.voiceChannel('Den');
    await rec.until('channelCreate for Den', Events.ChannelCreate, (c) => c.id === den, mark);
  });
  if (!made) return;

  const step = async (to, from) => {
    const mark = rec.mark();
    await run.sim.voice(user, to);
    const [v] = await rec.until(`voiceStateUpdate for ${user}`, Events.VoiceStateUpdate, (v) => v.user === user, mark);
    expect(v.before === from && v.after === to, `old/new channels ${v.before} -> ${v.after}, expected ${from} -> ${to}`);
    expect(v.guild === gid, `the state is of guild ${v.guild}`);
    const guild = client.guilds.cache.get(gid);
    for (const [id, channel] of guild.channels.cache) {
      if (channel.type !== ChannelType.GuildVoice) continue;
      const inIt = channel.members.has(user);
      expect(inIt === (id === to), `after the update the cache has ${user} ${inIt ? 'in' : 'not in'} ${channel.name}`);
    }
  };

  await run.check('join the lobby: old null, new Lobby', () => step(lobby, null));
  await run.check('move to the den: old Lobby, new Den', () => step(den, lobby));
  await run.check('mute themselves in the den: selfMute false -> true, same channel', async () => {
    const mark = rec.mark();
    await run.sim.voice(user, den, { self_mute: true });
    const [v] = await rec.until(`voiceStateUpdate for ${user}`, Events.VoiceStateUpdate, (v) => v.user === user, mark);
    expect(show(v.selfMute) === show([false, true]), `selfMute ${show(v.selfMute)}`);
    expect(v.before === den && v.after === den, `channels ${v.before} -> ${v.after}`);
  });
  await run.check('leave: old Den, new null', () => step(null, den));
}

// The REST calls Coven makes, each through discord.js, and the event each brings.
async function restWithDispatches(run) {
  const client = await run.ready();
  const state = await run.sim.state();
  const guild = client.guilds.cache.get(state.guild_id);
  const rec = client.rec;
  const player = await run.sim.player('cinder');
  const allow = [PermissionFlagsBits.ViewChannel, PermissionFlagsBits.Connect, PermissionFlagsBits.Speak];
  let role;
  let room;

  const roleMade = await run.check('guild.roles.create: roleCreate', async () => {
    const mark = rec.mark();
    role = await guild.roles.create({
      name: 'Room: lantern',
      permissions: [PermissionFlagsBits.ViewChannel, PermissionFlagsBits.Connect],
      reason: 'a room',
    });
    const [r] = await rec.until('roleCreate', Events.GuildRoleCreate, (r) => r.id === role.id, mark);
    const bits = (PermissionFlagsBits.ViewChannel | PermissionFlagsBits.Connect).toString();
    expect(r.name === 'Room: lantern' && r.permissions === bits, `the dispatched role ${show(r)}`);
    expect(guild.roles.cache.get(role.id)?.name === 'Room: lantern', 'the role is not in the cache');
  });
  if (!roleMade) return;

  const channelMade = await run.check('guild.channels.create (voice, overwrites): channelCreate', async () => {
    const mark = rec.mark();
    room = await guild.channels.create({
      name: 'lantern',
      type: ChannelType.GuildVoice,
      parent: state.room_category_id,
      userLimit: 4,
      permissionOverwrites: [
        { id: guild.roles.everyone, deny: [PermissionFlagsBits.ViewChannel, PermissionFlagsBits.Connect] },
        { id: role, allow },
        { id: client.user, allow: [...allow, PermissionFlagsBits.MoveMembers] },
      ],
    });
    const [c] = await rec.until('channelCreate', Events.ChannelCreate, (c) => c.id === room.id, mark);
    expect(c.type === ChannelType.GuildVoice && c.parentId === state.room_category_id && c.userLimit === 4,
      `the dispatched channel ${show(c)}`);
    const bits = (perms) => perms.reduce((a, b) => a | b, 0n).toString();
    const want = {
      [guild.id]: [0, '0', bits([PermissionFlagsBits.ViewChannel, PermissionFlagsBits.Connect])],
      [role.id]: [0, bits(allow), '0'],
      [client.user.id]: [1, bits([...allow, PermissionFlagsBits.MoveMembers]), '0'],
    };
    expect(show(sortKeys(c.overwrites)) === show(sortKeys(want)), `overwrites ${show(c.overwrites)}, asked for ${show(want)}`);
    const held = (await run.sim.state()).channels.find((x) => x.id === room.id);
    expect(held && held.user_limit === 4, `the sim holds ${show(held)}`);
  });

  if (channelMade) {
    await run.check('channel.permissionOverwrites.edit: channelUpdate', async () => {
      const mark = rec.mark();
      await room.permissionOverwrites.edit(role, { Speak: false });
      const [c] = await rec.until('channelUpdate', Events.ChannelUpdate, (c) => c.id === room.id, mark);
      const [, a, d] = c.overwrites[role.id] ?? [];
      const wantAllow = (PermissionFlagsBits.ViewChannel | PermissionFlagsBits.Connect).toString();
      expect(a === wantAllow && d === PermissionFlagsBits.Speak.toString(), `the role's overwrite is ${show(c.overwrites[role.id])}`);
    });
  }

  await run.check("member.roles.add and member.roles.remove: the member's roles in the sim", async () => {
    const member = await guild.members.fetch(player);
    const rolesOf = async () => (await run.sim.state()).members.find((m) => m.user_id === player)?.roles ?? null;
    await member.roles.add(role);
    let held = await rolesOf();
    expect(show(held) === show([role.id]), `after add the sim has roles ${show(held)}`);
    expect(member.roles.cache.has(role.id) || (await guild.members.fetch({ user: player, force: true })).roles.cache.has(role.id),
      'discord.js does not show the role on the member');
    await member.roles.remove(role);
    held = await rolesOf();
    expect(show(held) === '[]', `after remove the sim has roles ${show(held)}`);
  });

  if (channelMade) {
    await run.check('member.voice.setChannel and disconnect: voiceStateUpdate', async () => {
      let mark = rec.mark();
      await run.sim.voice(player, state.lobby_id);
      await rec.until('voiceStateUpdate (join)', Events.VoiceStateUpdate, (v) => v.user === player, mark);
      const member = guild.members.cache.get(player) ?? (await guild.members.fetch(player));
      mark = rec.mark();
      await member.voice.setChannel(room, 'into the room');
      let [v] = await rec.until('voiceStateUpdate (move)', Events.VoiceStateUpdate, (v) => v.user === player, mark);
      expect(v.before === state.lobby_id && v.after === room.id, `moved ${v.before} -> ${v.after}`);
      mark = rec.mark();
      await member.voice.disconnect();
      [v] = await rec.until('voiceStateUpdate (disconnect)', Events.VoiceStateUpdate, (v) => v.user === player, mark);
      expect(v.before === room.id && v.after === null, `disconnected ${v.before} -> ${v.after}`);
    });

    await run.check('channel.delete: channelDelete', async () => {
      const mark = rec.mark();
      await room.delete('the room is over');
      await rec.until('channelDelete', Events.ChannelDelete, (c) => c.id === room.id, mark);
      expect(!guild.channels.cache.has(room.id), 'the channel is still in the cache');
      const held = (await run.sim.state()).channels.find((x) => x.id === room.id);
      expect(!held, 'the sim still has the channel');
    });
  }

  await run.check('role.delete: roleDelete', async () => {
    const mark = rec.mark();
    await role.delete();
    await rec.until('roleDelete', Events.GuildRoleDelete, (r) => r.id === role.id, mark);
    expect(!guild.roles.cache.has(role.id), 'the role is still in the cache');
  });
}

// A 429 of `scope` (user: the route's bucket; global; shared): @discordjs/rest waits
// `Retry-After` and asks again, and the call succeeds once.
async function rateLimit(run, scope) {
  const client = await run.ready();
  const rec = client.rec;
  const state = await run.sim.state();
  const guild = client.guilds.cache.get(state.guild_id);
  const retryAfter = 1.5;
  const fault = { method: 'POST', path: '/guilds/*/roles', status: 429, retry_after: retryAfter };
  if (scope === 'global') fault.global = true;
  else if (scope === 'shared') fault.scope = 'shared';

  await run.check(`a ${scope} 429 is waited out and the call succeeds once`, async () => {
    await run.sim.fail(fault);
    const mark = rec.mark();
    const before = (await run.sim.state()).roles.length;
    const seen = [];
    const note = (m) => {
      if (m.includes('Encountered unexpected 429 rate limit')) seen.push(m);
    };
    client.rest.on(RESTEvents.Debug, note);
    const started = Date.now();
    let role;
    try {
      role = await guild.roles.create({ name: `${scope} 429` });
    } finally {
      client.rest.off(RESTEvents.Debug, note);
    }
    const took = (Date.now() - started) / 1000;
    expect(seen.length === 1, `@discordjs/rest saw ${seen.length} 429s, not 1`);
    expect(seen[0].includes(`Scope          : ${scope}`) && seen[0].includes(`Global         : ${scope === 'global'}`),
      `the 429 as @discordjs/rest read it:\n${seen[0]}`);
    expect(took >= retryAfter - 0.05, `the call came back after ${took.toFixed(2)}s, before retry_after`);
    await rec.until('roleCreate', Events.GuildRoleCreate, (r) => r.id === role.id, mark);
    const after = (await run.sim.state()).roles.length;
    expect(after === before + 1, `${after - before} roles made, not 1`);
  });

  if (scope === 'global') {
    await run.check('another route waits while a global 429 lasts', async () => {
      // A global 429 holds every route: a call to another route made while the first
      // one waits goes out only after the global limit is over.
      await run.sim.fail(fault);
      let hit;
      const limited = new Promise((resolve) => {
        hit = (m) => {
          if (m.includes('Encountered unexpected 429 rate limit')) resolve();
        };
      });
      client.rest.on(RESTEvents.Debug, hit);
      const started = Date.now();
      try {
        const first = guild.roles.create({ name: 'global 429 again' });
        await Promise.race([limited, sleep(DEADLINE).then(() => { throw new Failed('@discordjs/rest never saw the 429'); })]);
        await client.channels.fetch(state.lobby_id, { force: true });
        const took = (Date.now() - started) / 1000;
        await first;
        expect(took >= retryAfter - 0.05, `a call to another route came back ${took.toFixed(2)}s after the global 429 began`);
      } finally {
        client.rest.off(RESTEvents.Debug, hit);
      }
    });
  }
}

// op 7 RECONNECT: discord.js reconnects and RESUMEs (shardResume, no new READY), and
// every change made meanwhile arrives once, in order, one of them through the replay.
async function resume(run) {
  const client = await run.ready();
  const rec = client.rec;
  const state = await run.sim.state();
  const lobby = state.lobby_id;
  const player = await run.sim.player('dusk');
  const den = await run.sim.voiceChannel('Den');
  await rec.until('channelCreate for Den', Events.ChannelCreate, (c) => c.id === den);
  const before = await run.sim.gateway();
  const session = client.ws.shards.get(0)?.sessionInfo?.sessionId;
  const sent = [];
  let moving = Promise.resolve();
  // One move at a time, in the order they are asked for.
  const move = () => {
    moving = moving.then(async () => {
      const to = sent.length && sent[sent.length - 1] === lobby ? den : lobby;
      await run.sim.voice(player, to);
      sent.push(to);
    });
    return moving;
  };
  const got = (mark) => rec.seen(Events.VoiceStateUpdate, mark).map(([v]) => v).filter((v) => v.user === player && v.after).map((v) => v.after);
  // Moves discord.js got between losing the socket and RESUMED: the replay's.
  const replayed = (since) => {
    const names = rec.events.slice(since).map((e) => e.name);
    const from = names.indexOf(Events.ShardReconnecting);
    const to = names.indexOf(Events.ShardResume);
    if (from < 0 || to < 0) return 0;
    return names.slice(from, to).filter((n) => n === Events.VoiceStateUpdate).length;
  };

  await run.check('op 7: shardResume, the same session, every move once and in order', async () => {
    const mark = rec.mark();
    let stop = false;
    const mover = (async () => {
      while (!stop) {
        await move();
        await sleep(10);
      }
    })();
    const replays = [];
    const counted = [];
    let rounds = 0;
    try {
      await sleep(50);
      // Up to three rounds, until a move has reached discord.js through the replay: one
      // made right after op 7 comes after it on the old socket, which discord.js stops
      // reading at op 7, so it arrives only replayed on RESUME.
      while (rounds < 3 && !replays.some((n) => n > 0)) {
        const since = rec.mark();
        await run.sim.ok('POST', '/gateway/reconnect');
        await move();
        const [, n] = await rec.until('shardResume after op 7', Events.ShardResume, () => true, since);
        rounds += 1;
        replays.push(replayed(since));
        counted.push(n);
      }
    } finally {
      stop = true;
      await mover;
    }
    // A few more after the resume: the session goes on live.
    for (let i = 0; i < 3; i += 1) await move();
    await rec.until('the last move', Events.VoiceStateUpdate, (v) => v.user === player && got(mark).length >= sent.length, mark);
    const moves = got(mark);
    expect(show(moves) === show(sent), `moves seen ${show(moves)}\n  moves made ${show(sent)}`);
    console.log(`INFO ${run.name}: ${rounds} RESUME(s); moves replayed in each: ${show(replays)}; ` +
      `shardResume's replayedEvents: ${show(counted)}; ${sent.length} moves in all`);
    expect(replays.some((n) => n > 0), `in ${rounds} rounds no move reached discord.js through the replay (each came live), so the replay went untested`);
    expect(rec.seen(Events.ClientReady, mark).length === 0 && rec.seen(Events.ShardReady, mark).length === 0,
      `a new READY came (${rec.summary(mark)})`);
    const now = client.ws.shards.get(0)?.sessionInfo?.sessionId;
    expect(session && now === session, `the session id changed: ${session} -> ${now}`);
    const after = await run.sim.gateway();
    expect(after.resumes === before.resumes + rounds && after.identifies === before.identifies,
      `${rounds} RESUME(s); the sim counts resumes ${before.resumes} -> ${after.resumes}, identifies ${before.identifies} -> ${after.identifies}`);
  }, 2 * DEADLINE + 30_000);
}

// REST calls bots make first, beyond Coven's own.
async function firstCalls(run) {
  const client = await run.ready();
  const state = await run.sim.state();
  const gid = state.guild_id;
  const guild = client.guilds.cache.get(gid);
  const rec = client.rec;
  const roleIds = sorted(state.roles.map((r) => r.id));

  await run.check('client.application.fetch (GET /applications/@me)', async () => {
    const app = await client.application.fetch();
    expect(app.id === state.client_id, `the application is ${app.id}, the sim says ${state.client_id}`);
  });
  await run.check('client.guilds.fetch({guild, force}) (GET /guilds/{g}?with_counts=true)', async () => {
    const got = await client.guilds.fetch({ guild: gid, force: true });
    expect(got.id === gid && got.name === guild.name, `fetched ${got.id} ${got.name}`);
    expect(show(sorted(got.roles.cache.keys())) === show(roleIds), `roles ${show(sorted(got.roles.cache.keys()))}`);
    const members = state.guilds.find((g) => g.id === gid).members;
    expect(got.approximateMemberCount === members, `approximateMemberCount ${got.approximateMemberCount}, the sim has ${members}`);
  });
  await run.check('guild.roles.fetch (GET /guilds/{g}/roles)', async () => {
    const got = await guild.roles.fetch(undefined, { force: true });
    expect(show(sorted(got.keys())) === show(roleIds), `fetched roles ${show(sorted(got.keys()))}`);
  });
  await run.check('client.users.fetch (GET /users/{u})', async () => {
    const uid = await run.sim.user('bramble');
    const got = await client.users.fetch(uid, { force: true });
    expect(got.id === uid && got.username === 'bramble' && !got.bot, `fetched ${got.id} ${got.username}`);
  });
  await run.check('client.channels.fetch (GET /channels/{c})', async () => {
    const got = await client.channels.fetch(state.lobby_id, { force: true });
    expect(got.id === state.lobby_id && got.name === 'Lobby' && got.type === ChannelType.GuildVoice, `fetched ${got.id} ${got.name}`);
  });
  await run.check('client.guilds.fetch() (GET /users/@me/guilds)', async () => {
    const got = await client.guilds.fetch();
    const want = sorted(state.guilds.filter((g) => g.bot).map((g) => g.id));
    expect(show(sorted(got.keys())) === show(want), `fetched guilds ${show(sorted(got.keys()))}, the bot is in ${show(want)}`);
  });
  await run.check('guild.channels.fetch (GET /guilds/{g}/channels)', async () => {
    const got = await guild.channels.fetch(undefined, { force: true });
    const want = sorted(state.channels.filter((c) => c.bot_can_view !== false).map((c) => c.id));
    expect(show(sorted(got.keys())) === show(want), `fetched channels ${show(sorted(got.keys()))}, the sim has ${show(want)}`);
  });
  await run.check('guild.members.fetch the bot (GET /guilds/{g}/members/{u})', async () => {
    const got = await guild.members.fetch({ user: client.user.id, force: true });
    const want = sorted(state.members.find((m) => m.user_id === client.user.id).roles);
    const have = sorted([...got.roles.cache.keys()].filter((r) => r !== gid));
    expect(show(have) === show(want), `the bot member has roles ${show(have)}, the sim has ${show(want)}`);
  });
  await run.check('guild.members.editMe({nick}) (PATCH /guilds/{g}/members/@me): guildMemberUpdate', async () => {
    const mark = rec.mark();
    await guild.members.editMe({ nick: 'Coven (sim)' });
    // Discord sends GUILD_MEMBER_UPDATE for the current user's own member whatever the
    // intents.
    const [m] = await rec.until('guildMemberUpdate for the bot', Events.GuildMemberUpdate, (m) => m.id === client.user.id, mark);
    expect(m.nick === 'Coven (sim)', `the nick is ${show(m.nick)}`);
  });
}

// Documented params of the routes the sim serves, through discord.js, each honoured with
// its dispatch or refused as Discord refuses it.
async function everyParam(run) {
  const client = await run.ready();
  const state = await run.sim.state();
  const guild = client.guilds.cache.get(state.guild_id);
  const lobby = guild.channels.cache.get(state.lobby_id);
  const player = await run.sim.player('fable');
  const rec = client.rec;
  let role;

  await run.check("member.edit({roles}) (Modify Guild Member's roles)", async () => {
    role = await guild.roles.create({ name: 'Regular', permissions: [] });
    const member = await guild.members.fetch(player);
    await member.edit({ roles: [role] });
    const again = await guild.members.fetch({ user: player, force: true });
    const have = sorted([...again.roles.cache.keys()].filter((r) => r !== guild.id));
    expect(show(have) === show([role.id]), `PATCH roles answered; the member has ${show(have)}`);
    const held = (await run.sim.state()).members.find((m) => m.user_id === player).roles;
    expect(show(held) === show([role.id]), `the sim has ${show(held)}`);
  });
  await run.check('member.edit({mute, deaf}): voiceStateUpdate with serverMute and serverDeaf', async () => {
    let mark = rec.mark();
    await run.sim.voice(player, lobby.id);
    await rec.until('the player in the lobby', Events.VoiceStateUpdate, (v) => v.user === player && v.after === lobby.id, mark);
    mark = rec.mark();
    const member = guild.members.cache.get(player) ?? (await guild.members.fetch(player));
    await member.edit({ mute: true, deaf: true });
    const [v] = await rec.until('voiceStateUpdate with mute and deaf', Events.VoiceStateUpdate, (v) => v.user === player, mark);
    expect(v.serverMute === true && v.serverDeaf === true && v.after === lobby.id, `the voice state says ${show(v)}`);
  });
  await run.check('member.setNickname without Manage Nicknames: 403 50013', async () => {
    const member = await guild.members.fetch(player);
    try {
      await member.setNickname('Fabulous');
    } catch (e) {
      expect(e.status === 403 && e.code === 50013, `refused with ${e.status} ${e.code}: ${e.message}`);
      return;
    }
    throw new Failed('a nick without Manage Nicknames was accepted');
  });
  await run.check('channel.edit({parent, bitrate}) (Modify Channel): channelUpdate', async () => {
    const mark = rec.mark();
    await lobby.edit({ parent: state.room_category_id, bitrate: 48_000 });
    const [c] = await rec.until('channelUpdate for the lobby', Events.ChannelUpdate, (c) => c.id === lobby.id, mark);
    expect(c.parentId === state.room_category_id && c.bitrate === 48_000, `the lobby is ${show(c)}`);
  });
  await run.check('guild.channels.setPositions (Modify Guild Channel Positions): channelUpdate', async () => {
    const second = await guild.channels.create({ name: 'second', type: ChannelType.GuildVoice });
    await rec.until('the new channel', Events.ChannelCreate, (c) => c.id === second.id);
    const mark = rec.mark();
    await guild.channels.setPositions([{ channel: second, position: 0 }]);
    await rec.until('channelUpdate with position 0', Events.ChannelUpdate, (c) => c.id === second.id && c.position === 0, mark);
  });
  await run.check('guild.roles.setPositions (Modify Guild Role Positions): roleUpdate', async () => {
    const below = await guild.roles.create({ name: 'Below' });
    await rec.until('the new role', Events.GuildRoleCreate, (r) => r.id === below.id);
    // The new role is moved above the other one. (Not the other way round: the sim
    // renumbers the other roles when one is created, without a GUILD_ROLE_UPDATE, so
    // discord.js's cached positions of older roles are behind the sim's; see
    // /work/notes/djs-findings.md. Moving the newest role works the same either way.)
    const want = Math.max(below.rawPosition, guild.roles.cache.get(role.id).rawPosition) + 1;
    const mark = rec.mark();
    await guild.roles.setPositions([{ role: below, position: want }]);
    await rec.until(`roleUpdate with position ${want}`, Events.GuildRoleUpdate, (r) => r.id === below.id && r.position === want, mark);
    expect(guild.roles.comparePositions(below.id, role.id) > 0,
      'discord.js does not rank the moved role above the other');
  });
  await run.check('role.edit({colors: {primaryColor}}) and the deprecated {color}: roleUpdate', async () => {
    let mark = rec.mark();
    await role.edit({ colors: { primaryColor: 0xff8800 } });
    await rec.until('roleUpdate with the colour', Events.GuildRoleUpdate, (r) => r.id === role.id && r.color === 0xff8800, mark);
    // `color` (deprecated, still in many bots) sends secondary and tertiary as null.
    mark = rec.mark();
    await role.edit({ color: 0x00aa55 });
    await rec.until('roleUpdate with the colour', Events.GuildRoleUpdate, (r) => r.id === role.id && r.color === 0x00aa55, mark);
  });
}

// op 9 INVALID_SESSION d:false: discord.js drops the session and identifies again (its
// identify throttle waits out the 5 s between IDENTIFYs): a new READY and the guilds.
async function reidentify(run) {
  const client = await run.ready();
  const rec = client.rec;
  const state = await run.sim.state();
  const before = await run.sim.gateway();
  const session = client.ws.shards.get(0)?.sessionInfo?.sessionId;

  await run.check('op 9 d:false: a new session and READY', async () => {
    const mark = rec.mark();
    await run.sim.ok('POST', '/gateway/invalidate', { resumable: false });
    await rec.until('shardReady again', Events.ShardReady, () => true, mark, DEADLINE + 5_000);
    const now = client.ws.shards.get(0)?.sessionInfo?.sessionId;
    expect(now && now !== session, `session ${session} -> ${now}`);
    const after = await run.sim.gateway();
    expect(after.identifies === before.identifies + 1, `identifies ${before.identifies} -> ${after.identifies}`);
    expect(after.identify_rejected === before.identify_rejected, 'an IDENTIFY was refused (too early for its bucket)');
    const want = sorted(state.guilds.filter((g) => g.bot).map((g) => g.id));
    const have = sorted(client.guilds.cache.filter((g) => g.available).keys());
    expect(show(have) === show(want), `guilds after READY ${show(have)}`);
  }, DEADLINE + 20_000);

  await run.check('the new session gets dispatches', async () => {
    const mark = rec.mark();
    const player = await run.sim.player('ember');
    await run.sim.voice(player, state.lobby_id);
    await rec.until('a voice update on the new session', Events.VoiceStateUpdate, (v) => v.user === player, mark);
  });
}

// The Gateway stops acknowledging heartbeats: @discordjs/ws notices (no ACK for the last
// heartbeat when the next is due), reconnects and RESUMEs without losing a dispatch.
async function zombie(run) {
  const client = await run.ready();
  const rec = client.rec;
  const state = await run.sim.state();
  const player = await run.sim.player('dusk');
  const before = await run.sim.gateway();
  const session = client.ws.shards.get(0)?.sessionInfo?.sessionId;

  await run.check('zombied connection: shardResume, the same session, every move once', async () => {
    const mark = rec.mark();
    await run.sim.voice(player, state.lobby_id);
    await run.sim.ok('POST', '/gateway/zombie');
    await run.sim.voice(player, null);
    await rec.until('shardResume after the zombie', Events.ShardResume, () => true, mark, DEADLINE + 5_000);
    await run.sim.voice(player, state.lobby_id);
    await rec.until('the last move', Events.VoiceStateUpdate,
      (v) => v.user === player && rec.seen(Events.VoiceStateUpdate, mark).filter(([x]) => x.user === player).length >= 3, mark);
    const moves = rec.seen(Events.VoiceStateUpdate, mark).map(([v]) => v).filter((v) => v.user === player).map((v) => v.after);
    expect(show(moves) === show([state.lobby_id, null, state.lobby_id]), `moves seen ${show(moves)}`);
    expect(rec.seen(Events.ShardReady, mark).length === 0, `a new READY came (${rec.summary(mark)})`);
    const now = client.ws.shards.get(0)?.sessionInfo?.sessionId;
    expect(session && now === session, `the session id changed: ${session} -> ${now}`);
    const after = await run.sim.gateway();
    expect(after.resumes === before.resumes + 1 && after.identifies === before.identifies,
      `the sim counts resumes ${before.resumes} -> ${after.resumes}, identifies ${before.identifies} -> ${after.identifies}`);
  }, 2 * DEADLINE + 10_000);
}

// shards: 'auto' with the count GET /gateway/bot recommends (two): both shards ready,
// each guild on the shard of Discord's formula, its dispatches on that shard.
async function twoShards(run) {
  const state = await run.sim.state();
  let client;
  const ok = await run.check('both shards ready', async () => {
    client = run.client({ shards: 'auto' });
    const ready = client.rec.until('clientReady', Events.ClientReady, () => true, 0, DEADLINE + 10_000);
    await client.login(run.token);
    await ready;
    expect(client.options.shardCount === 2, `shardCount ${client.options.shardCount} (GET /gateway/bot)`);
    const shards = client.rec.seen(Events.ShardReady).map(([id]) => id).sort();
    expect(show(shards) === show([0, 1]), `shards ready: ${show(shards)}`);
    const sessions = (await run.sim.gateway()).sessions;
    const held = sessions.filter((s) => s.connected && s.shard).map((s) => s.shard.join('/')).sort();
    expect(show(held) === show(['0/2', '1/2']), `the sim holds sessions ${show(sessions)}`);
  }, DEADLINE + 20_000);
  if (!ok) return;

  await run.check("each guild on its shard (Discord's formula)", async () => {
    for (const g of state.guilds.filter((g) => g.bot)) {
      const guild = client.guilds.cache.get(g.id);
      expect(guild && guild.shardId === g.shard, `${g.name} is on shard ${guild?.shardId}, the sim says ${g.shard}`);
    }
  });

  await run.check("a guild's dispatches come on its shard", async () => {
    for (const g of state.guilds.filter((g) => g.bot)) {
      const gstate = await run.sim.state(g.id);
      const player = gstate.users.find((u) => !u.bot && gstate.members.some((m) => m.user_id === u.id) &&
        !gstate.voice_states.some((v) => v.user_id === u.id));
      expect(player, `no one in ${g.name} to move`);
      const mark = client.rec.mark();
      await run.sim.voice(player.id, gstate.lobby_id);
      await client.rec.until(`voiceStateUpdate in ${g.name}`, Events.VoiceStateUpdate, (v) => v.user === player.id && v.guild === g.id, mark);
      const shards = client.rec.seen(Events.Raw, mark).filter(([t, gid]) => t === 'VOICE_STATE_UPDATE' && gid === g.id).map(([, , s]) => s);
      expect(show(shards) === show([g.shard]), `${g.name}'s VOICE_STATE_UPDATE came on shard(s) ${show(shards)}, not ${g.shard}`);
    }
  });
}

const SCENARIOS = {
  login_and_cache: loginAndCache,
  voice_updates: voiceUpdates,
  rest_with_dispatches: restWithDispatches,
  first_calls: firstCalls,
  every_param: everyParam,
  rate_limit_route: (run) => rateLimit(run, 'user'),
  rate_limit_global: (run) => rateLimit(run, 'global'),
  rate_limit_shared: (run) => rateLimit(run, 'shared'),
  resume,
  reidentify,
  zombie,
  two_shards: twoShards,
};

async function runScenario(name, simUrl, token) {
  const run = new Run(name, new Sim(simUrl), simUrl, token);
  try {
    await SCENARIOS[name](run);
  } catch (e) {
    run.fail('setup', e instanceof Failed ? e.message : `${e && e.stack ? e.stack : e}`);
  } finally {
    await run.close();
  }
  for (const client of run.clients) {
    for (const [error] of client.rec.seen(Events.Error)) run.fail('no error event', error);
    for (const [code, id] of client.rec.seen(Events.ShardDisconnect)) {
      run.fail('no shard given up', `shard ${id} closed with ${code} and will not reconnect`);
    }
  }
  const ok = run.passed;
  console.log(`RESULT ${name} ${ok ? 'passed' : 'failed'}`);
  return ok;
}

async function main() {
  const args = process.argv.slice(2);
  let sim = null;
  let token = 'sim-bot-token';
  const scenarios = [];
  for (let i = 0; i < args.length; i += 1) {
    if (args[i] === '--sim') sim = args[++i];
    else if (args[i] === '--token') token = args[++i];
    else if (args[i] === '--list') {
      console.log(Object.keys(SCENARIOS).join('\n'));
      return 0;
    } else scenarios.push(args[i]);
  }
  const unknown = scenarios.filter((s) => !(s in SCENARIOS));
  if (!sim || scenarios.length === 0 || unknown.length) {
    console.error(`usage: suite.js --sim URL --token TOKEN SCENARIO... (unknown: ${unknown.join(', ')}); --list lists them`);
    return 2;
  }
  log(`discord.js ${version} on node ${process.version}`);
  const pinned = require('./package.json').dependencies['discord.js'];
  if (version !== pinned) {
    console.log(`FAIL setup: discord.js ${version} was found (${require.resolve('discord.js')}), package.json pins ${pinned}: run scripts/test.sh again`);
    return 1;
  }
  let ok = true;
  for (const name of scenarios) ok = (await runScenario(name, sim, token)) && ok;
  return ok ? 0 : 1;
}

process.on('unhandledRejection', (e) => log('unhandled rejection:', e && e.stack ? e.stack : String(e)));
main().then(
  (code) => {
    process.exitCode = code;
    // A client that did not shut down cleanly must not keep the process alive.
    setTimeout(() => process.exit(code), 2_000).unref();
  },
  (e) => {
    console.error(e);
    process.exit(1);
  },
);
