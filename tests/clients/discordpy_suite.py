#!/usr/bin/env python3
"""discord.py, unmodified, against `coven sim`.

Only discord.py's base URLs change: `discord.http.Route.BASE` (REST) and
`discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY` (the Gateway `Client.connect` dials;
`AutoShardedClient` takes the URL `GET /gateway/bot` gives). Everything else is the
library as a bot developer gets it from PyPI, with its defaults (compression asked for,
default intents), driven through its public API only.

Usage: discordpy_suite.py --sim http://127.0.0.1:PORT --token TOKEN SCENARIO...
(`--list` prints the scenarios). Each scenario runs its checks with deadlines and
prints one line per check (`PASS`/`FAIL scenario: check: reason`) and a closing
`RESULT scenario passed|failed` line; the exit status is 0 only if every scenario
passed. discord.py's own log goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
import traceback
from types import SimpleNamespace
from typing import Any, Awaitable, Callable, Optional

import aiohttp
import discord
import yarl

# How long any one condition may take before its check fails.
DEADLINE = 15.0

log = logging.getLogger('suite')


class Failed(Exception):
    """A check's condition did not hold; the message says what was seen."""


def point_at(sim: str) -> None:
    """The only change to discord.py: where Discord is."""
    base = sim.rstrip('/')
    discord.http.Route.BASE = f'{base}/api/v10'
    ws = yarl.URL(base)
    ws = ws.with_scheme('wss' if ws.scheme == 'https' else 'ws')
    discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = ws.with_path('/')


# --------------------------------------------------------------------------------------
# The simulator's control API.


class Sim:
    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base.rstrip('/')
        self.session = session

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(method, f'{self.base}/_sim{path}', json=body) as res:
            try:
                data = await res.json(content_type=None)
            except ValueError:
                data = None
            return res.status, data

    async def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.call(method, path, body)
        if not 200 <= status < 300:
            raise Failed(f'control API {method} /_sim{path} answered {status}: {data}')
        return data

    async def state(self, guild: Optional[int] = None) -> dict:
        return await self.ok('GET', '/state' if guild is None else f'/state?guild={guild}')

    async def user(self, username: str) -> int:
        state = await self.state()
        for u in state['users']:
            if u['username'] == username:
                return int(u['id'])
        raise Failed(f'the simulator has no user {username}')

    async def voice(self, user: int, channel: Optional[int]) -> None:
        await self.ok(
            'POST',
            '/voice',
            {'user_id': str(user), 'channel_id': None if channel is None else str(channel)},
        )

    async def player(self, username: str) -> int:
        """A user to move around voice, out of voice to begin with (the suite may run
        against a simulator that earlier runs changed)."""
        user = await self.user(username)
        state = await self.state()
        if any(int(v['user_id']) == user for v in state['voice_states']):
            await self.voice(user, None)
        return user

    async def voice_channel(self, name: str) -> int:
        channel = await self.ok('POST', '/channels', {'name': name, 'type': 2})
        return int(channel['id'])

    async def gateway(self) -> dict:
        return (await self.state())['gateway']

    async def identify_bucket_free(self) -> None:
        """Waits until 5 s have passed since the last IDENTIFY the simulator accepted
        (one per bucket per 5 s, `max_concurrency` 1)."""
        sessions = (await self.gateway())['sessions']
        last = max((t for s in sessions for t in s['identified_at_ms']), default=0)
        wait = last / 1000 + 5.1 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)

    async def fail(self, fault: dict) -> None:
        await self.ok('POST', '/rest/fail', fault)


# --------------------------------------------------------------------------------------
# A bot that records what discord.py tells it, and waits on that with deadlines.


class Recorder:
    """What a client's event handlers saw, in order, and waiting on it."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple]] = []
        self.changed = asyncio.Event()
        self.task: Optional[asyncio.Task] = None
        self.watches: list[asyncio.Future] = []

    def add(self, name: str, *args: Any) -> None:
        self.events.append((name, args))
        self.changed.set()

    def mark(self) -> int:
        return len(self.events)

    def seen(self, name: str, since: int = 0) -> list[tuple]:
        return [args for (n, args) in self.events[since:] if n == name]

    def summary(self, since: int = 0) -> str:
        names = [n for (n, _) in self.events[since:]]
        return ', '.join(names[-30:]) or 'nothing'

    async def until(
        self,
        what: str,
        name: str,
        check: Callable[..., bool] = lambda *a: True,
        since: int = 0,
        timeout: float = DEADLINE,
    ) -> tuple:
        """The first `name` event from `since` on whose arguments pass `check`."""
        deadline = time.monotonic() + timeout
        while True:
            for n, args in self.events[since:]:
                if n == name and check(*args):
                    return args
            if self.task is not None and self.task.done():
                error = self.task.exception() if not self.task.cancelled() else None
                raise Failed(f'the client stopped ({error!r}) while waiting for {what}')
            left = deadline - time.monotonic()
            if left <= 0:
                raise Failed(
                    f'no {what} within {timeout:.0f}s; events since: {self.summary(since)}'
                )
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass


def snapshot(voice: discord.VoiceState) -> SimpleNamespace:
    return SimpleNamespace(
        channel=voice.channel,
        mute=voice.mute,
        deaf=voice.deaf,
        self_mute=voice.self_mute,
        self_deaf=voice.self_deaf,
    )


# The events the suite notes, in the order discord.py dispatches them.
EVENTS = [
    'connect', 'disconnect', 'ready', 'resumed', 'shard_ready', 'shard_resumed',
    'guild_available', 'voice_state_update', 'guild_channel_create', 'guild_channel_update',
    'guild_channel_delete', 'guild_role_create', 'guild_role_update', 'guild_role_delete',
    'member_update', 'guild_unavailable', 'guild_remove', 'guild_join',
]


def recording(base: type) -> type:
    """A client class (`discord.Client` or `discord.AutoShardedClient`) that notes every
    event of EVENTS in `self.rec` as discord.py dispatches it."""

    class Bot(base):  # type: ignore[misc, valid-type]
        def __init__(self, **options: Any) -> None:
            options.setdefault('intents', discord.Intents.default())
            super().__init__(**options)
            self.rec = Recorder()

        async def setup_hook(self) -> None:
            # Noted where discord.py dispatches each event, by `wait_for`'s check (called
            # there, synchronously; it notes the event and keeps waiting), not in on_*
            # handlers, which run later as tasks: by then the voice state an
            # on_voice_state_update's `after` is has been changed in place by later
            # updates, and events would be noted out of the order they came in.
            for name in EVENTS:
                self.rec.watches.append(asyncio.ensure_future(self.wait_for(name, check=self._noter(name))))
            await asyncio.sleep(0)

        def _noter(self, name: str) -> Callable[..., bool]:
            def note(*args: Any) -> bool:
                if name == 'voice_state_update':
                    member, before, after = args
                    args = (member, snapshot(before), snapshot(after))
                self.rec.add(name, *args)
                return False

            return note

        async def on_error(self, event: str, *args: Any, **kwargs: Any) -> None:
            self.rec.add('error', event, traceback.format_exc())

    return Bot


Bot = recording(discord.Client)
ShardedBot = recording(discord.AutoShardedClient)


class Run:
    """One scenario's run: its checks' outcomes, a control API client, and the clients
    it started (closed at the end)."""

    def __init__(self, name: str, sim: Sim, token: str) -> None:
        self.name = name
        self.sim = sim
        self.token = token
        self.results: list[tuple[str, Optional[str]]] = []
        self.clients: list[discord.Client] = []

    async def check(self, what: str, body: Callable[[], Awaitable[Any]], timeout: float = 60.0) -> bool:
        """Runs one check; a failure is noted, not raised, so later checks still run."""
        try:
            await asyncio.wait_for(body(), timeout)
        except Failed as e:
            self.fail(what, str(e))
            return False
        except asyncio.TimeoutError:
            self.fail(what, f'the check took longer than {timeout:.0f}s')
            return False
        except Exception as e:  # a discord.py error is a failed check, with its story
            detail = ''.join(traceback.format_exception(type(e), e, e.__traceback__)[-6:])
            self.fail(what, f'{type(e).__name__}: {e}\n{detail}')
            return False
        self.results.append((what, None))
        print(f'PASS {self.name}: {what}', flush=True)
        return True

    def fail(self, what: str, reason: str) -> None:
        self.results.append((what, reason))
        print(f'FAIL {self.name}: {what}: {reason}', flush=True)

    async def client(self, cls: type = None, **options: Any) -> discord.Client:
        """A client logged in and connected (its connect loop running), not yet ready."""
        client = (cls or Bot)(**options)
        self.clients.append(client)
        await client.login(self.token)
        client.rec.task = asyncio.create_task(client.connect(), name='connect')
        return client

    async def ready(self, cls: type = None, timeout: float = DEADLINE, **options: Any) -> discord.Client:
        client = await self.client(cls, **options)
        await client.rec.until('on_ready', 'ready', timeout=timeout)
        return client

    async def close(self) -> None:
        for client in self.clients:
            try:
                await asyncio.wait_for(client.close(), DEADLINE)
            except Exception as e:  # closing is best effort; the outcome is decided
                log.warning('closing a client: %r', e)
            for watch in client.rec.watches:
                watch.cancel()
            task = client.rec.task
            if task is not None and task.done() and not task.cancelled() and task.exception():
                log.info('connect ended with %r', task.exception())

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(reason is None for _, reason in self.results)


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise Failed(message)


def ids(items) -> list[int]:
    return sorted(int(i) for i in items)


# --------------------------------------------------------------------------------------
# Scenarios.


async def login_and_cache(run: Run) -> None:
    """Client.login + connect: the logged-in user and application, on_ready, and the
    cache of every guild matching what the simulator holds."""
    state = await run.sim.state()
    client = Bot()
    run.clients.append(client)

    async def login() -> None:
        await client.login(run.token)
        expect(client.user is not None and client.user.id == int(state['bot_id']),
               f'logged in as {client.user!r}, the bot is {state["bot_id"]}')
        expect(client.user.bot, 'the bot user is not marked bot')
        expect(client.application_id == int(state['client_id']),
               f'application id {client.application_id}, the sim says {state["client_id"]}')

    if not await run.check('login: GET /users/@me and the application', login):
        return

    async def ready() -> None:
        client.rec.task = asyncio.create_task(client.connect(), name='connect')
        await client.rec.until('on_ready', 'ready')
        expect(client.ws is not None and client.ws.session_id, 'no session after READY')

    if not await run.check('connect: on_ready', ready):
        return

    async def guilds() -> None:
        want = ids(g['id'] for g in state['guilds'] if g['bot'] and not g['unavailable'])
        have = ids(g.id for g in client.guilds)
        expect(have == want, f'guilds in the cache {have}, the bot is in {want}')
        for g in state['guilds']:
            guild = client.get_guild(int(g['id']))
            if guild is not None:
                expect(guild.name == g['name'], f'guild {g["id"]} is {guild.name!r}, not {g["name"]!r}')
                expect(guild.member_count == g['members'],
                       f'{g["name"]}: member_count {guild.member_count}, the sim has {g["members"]}')

    await run.check('the guilds the bot is in, with names and member counts', guilds)

    for g in state['guilds']:
        if not g['bot']:
            continue
        gid = int(g['id'])
        gstate = await run.sim.state(gid)
        await run.check(f'{g["name"]}: channels, roles and overwrites', lambda: same_guild(client, gid, gstate))
        await run.check(f'{g["name"]}: members and their roles', lambda: same_members(client, gid, gstate))

    async def under_the_limits() -> None:
        # Reading every member above is more requests than one bucket allows a window:
        # discord.py must have waited by the X-RateLimit-* headers, never hitting a 429.
        rest = (await run.sim.state())['rest']
        expect(rest['rate_limited'] == 0, f'the sim answered {rest["rate_limited"]} 429s: {rest}')

    await run.check('the bucket headers kept discord.py from any 429', under_the_limits)


async def same_guild(client: discord.Client, gid: int, state: dict) -> None:
    guild = client.get_guild(gid)
    expect(guild is not None, f'guild {gid} not in the cache')
    want = {
        int(c['id']): (c['name'], c['type'], c['parent_id'] and int(c['parent_id']))
        for c in state['channels']
        if c.get('bot_can_view', True)
    }
    have = {c.id: (c.name, c.type.value, c.category_id) for c in guild.channels}
    expect(have == want, f'channels {have}\n  the sim has {want}')
    for c in state['channels']:
        channel = guild.get_channel(int(c['id']))
        if channel is None:
            continue
        want_ow = {
            int(o['id']): (int(o['allow']), int(o['deny'])) for o in c['permission_overwrites']
        }
        have_ow = {
            target.id: tuple(p.value for p in ow.pair()) for target, ow in channel.overwrites.items()
        }
        expect(have_ow == want_ow, f'{c["name"]}: overwrites {have_ow}, the sim has {want_ow}')
        if c['type'] == 2 and c.get('user_limit') is not None:
            expect(channel.user_limit == c['user_limit'],
                   f'{c["name"]}: user_limit {channel.user_limit}, the sim has {c["user_limit"]}')
    want_roles = {
        int(r['id']): (r['name'], int(r['permissions']), r['position'], r['managed'])
        for r in state['roles']
    }
    have_roles = {
        r.id: (r.name, r.permissions.value, r.position, r.managed) for r in guild.roles
    }
    expect(have_roles == want_roles, f'roles {have_roles}\n  the sim has {want_roles}')
    bot_role = guild.self_role
    managed = [r for r in state['roles'] if r['managed']]
    if managed:
        expect(bot_role is not None and bot_role.id == int(managed[0]['id']),
               f'Guild.self_role is {bot_role!r}; the managed role is {managed[0]["id"]} '
               '(discord.py finds it by tags.bot_id)')


async def same_members(client: discord.Client, gid: int, state: dict) -> None:
    guild = client.get_guild(gid)
    expect(guild is not None, f'guild {gid} not in the cache')
    me = guild.me
    bot_id = int(state['bot_id'])
    expect(me is not None and me.id == bot_id, f'Guild.me is {me!r}')
    for m in state['members']:
        uid = int(m['user_id'])
        want = ids(m['roles'])
        # Without the (privileged) members intent discord.py caches only the bot and
        # whoever is in voice; everyone else is read through Get Guild Member.
        member = guild.get_member(uid) or await guild.fetch_member(uid)
        have = ids(r.id for r in member.roles if not r.is_default())
        expect(have == want, f'member {uid}: roles {have}, the sim has {want}')
    voice = {int(v['user_id']): int(v['channel_id']) for v in state['voice_states']}
    cached = {
        uid: vs.channel.id
        for uid, vs in ((m.id, m.voice) for m in guild.members)
        if vs is not None and vs.channel is not None
    }
    expect(cached == voice, f'voice states {cached}, the sim has {voice}')


async def voice_updates(run: Run) -> None:
    """A simulated player joins, moves and leaves through the control API:
    on_voice_state_update with the right before and after channels each time."""
    client = await run.ready()
    state = await run.sim.state()
    gid = int(state['guild_id'])
    lobby = int(state['lobby_id'])
    user = await run.sim.player('bramble')
    rec = client.rec
    den: list[int] = []

    async def new_channel() -> None:
        mark = rec.mark()
        den.append(await run.sim.voice_channel('Den'))
        await rec.until('on_guild_channel_create for Den', 'guild_channel_create',
                        lambda c: c.id == den[0], since=mark)

    if not await run.check('an admin makes a second voice channel: on_guild_channel_create', new_channel):
        return

    async def step(to: Optional[int], before: Optional[int]) -> None:
        mark = rec.mark()
        await run.sim.voice(user, to)
        member, b, a = await rec.until(
            f'on_voice_state_update for {user}', 'voice_state_update',
            lambda m, b, a: m.id == user, since=mark)
        got = (b.channel and b.channel.id, a.channel and a.channel.id)
        expect(got == (before, to), f'before/after channels {got}, expected {(before, to)}')
        expect(member.guild.id == gid, f'the member is of guild {member.guild.id}')
        guild = client.get_guild(gid)
        in_channel = {c.id: [m.id for m in c.members] for c in guild.voice_channels}
        for cid, members in in_channel.items():
            expect((user in members) == (cid == to),
                   f'after the update the cache has {user} in {cid}: {in_channel}')

    async def self_mute() -> None:
        mark = rec.mark()
        await run.sim.ok('POST', '/voice', {'user_id': str(user), 'channel_id': str(den[0]), 'self_mute': True})
        _, b, a = await rec.until(f'on_voice_state_update for {user}', 'voice_state_update',
                                  lambda m, b, a: m.id == user, since=mark)
        expect((b.self_mute, a.self_mute) == (False, True), f'self_mute {b.self_mute} -> {a.self_mute}')
        expect(b.channel == a.channel and a.channel.id == den[0], f'channel {b.channel} -> {a.channel}')

    await run.check('join the lobby: before None, after Lobby', lambda: step(lobby, None))
    await run.check('move to the den: before Lobby, after Den', lambda: step(den[0], lobby))
    await run.check('mute themselves in the den: self_mute False -> True, same channel', self_mute)
    await run.check('leave: before Den, after None', lambda: step(None, den[0]))


async def rest_with_dispatches(run: Run) -> None:
    """The REST calls Coven makes, each through discord.py, and the event each brings."""
    client = await run.ready()
    state = await run.sim.state()
    gid = int(state['guild_id'])
    guild = client.get_guild(gid)
    category = guild.get_channel(int(state['room_category_id']))
    lobby = guild.get_channel(int(state['lobby_id']))
    player = await run.sim.player('cinder')
    rec = client.rec
    made: dict[str, Any] = {}

    async def create_role() -> None:
        mark = rec.mark()
        perms = discord.Permissions(view_channel=True, connect=True, speak=True)
        role = await guild.create_role(name='Room 1 key', permissions=perms,
                                       colour=discord.Colour(0x3366CC), reason='suite')
        made['role'] = role
        (got,) = await rec.until('on_guild_role_create', 'guild_role_create',
                                 lambda r: r.id == role.id, since=mark)
        expect(got.name == 'Room 1 key' and got.permissions == perms,
               f'the dispatched role is {got.name!r} with {got.permissions.value}')
        sim_role = [r for r in (await run.sim.state())['roles'] if int(r['id']) == role.id]
        expect(sim_role and int(sim_role[0]['permissions']) == perms.value,
               f'the sim has {sim_role}')

    async def role_colour() -> None:
        role = guild.get_role(made['role'].id)
        expect(role is not None and role.colour.value == 0x3366CC,
               f'Create Guild Role sent colors.primary_color 0x3366cc; the role has '
               f'{role and role.colour.value:#x}')

    async def edit_role() -> None:
        mark = rec.mark()
        role = made['role']
        perms = discord.Permissions(view_channel=True, connect=True)
        await role.edit(name='Room 1 guest', permissions=perms)
        _, after = await rec.until('on_guild_role_update', 'guild_role_update',
                                   lambda b, a: a.id == role.id, since=mark)
        expect(after.name == 'Room 1 guest' and after.permissions == perms,
               f'after the edit the role is {after.name!r} with {after.permissions.value}')

    async def create_channel() -> None:
        mark = rec.mark()
        role = made['role']
        overwrites = {
            guild.default_role: discord.PermissionOverwrite(view_channel=False, connect=False),
            role: discord.PermissionOverwrite(view_channel=True, connect=True),
            guild.me: discord.PermissionOverwrite(view_channel=True, connect=True, move_members=True),
        }
        channel = await guild.create_voice_channel('Room 1', category=category,
                                                   overwrites=overwrites, user_limit=4)
        made['channel'] = channel
        (got,) = await rec.until('on_guild_channel_create', 'guild_channel_create',
                                 lambda c: c.id == channel.id, since=mark)
        expect(got.category_id == category.id, f'the room is in {got.category_id}')
        expect(got.user_limit == 4, f'the room has user_limit {got.user_limit}')
        have = {t.id: tuple(p.value for p in o.pair()) for t, o in got.overwrites.items()}
        want = {t.id: tuple(p.value for p in o.pair()) for t, o in overwrites.items()}
        expect(have == want, f'overwrites {have}, asked for {want}')

    async def set_permissions() -> None:
        mark = rec.mark()
        channel, role = made['channel'], made['role']
        await channel.set_permissions(role, view_channel=True, connect=False)
        _, after = await rec.until('on_guild_channel_update', 'guild_channel_update',
                                   lambda b, a: a.id == channel.id, since=mark)
        ow = after.overwrites_for(role)
        expect(ow.connect is False and ow.view_channel is True,
               f'after PUT permissions the role has {ow.pair()}')

    async def edit_overwrites() -> None:
        mark = rec.mark()
        channel, role = made['channel'], made['role']
        overwrites = dict(channel.overwrites)
        overwrites[role] = discord.PermissionOverwrite(view_channel=True, connect=True, speak=True)
        await channel.edit(overwrites=overwrites)
        _, after = await rec.until('on_guild_channel_update', 'guild_channel_update',
                                   lambda b, a: a.id == channel.id and a.overwrites_for(role).speak,
                                   since=mark)
        expect(after.overwrites_for(role).connect is True, 'connect not allowed after the edit')

    async def add_role() -> None:
        member = await guild.fetch_member(player)
        made['member'] = member
        await member.add_roles(made['role'])
        # GUILD_MEMBER_UPDATE needs the privileged GUILD_MEMBERS intent, which this bot
        # (like Coven) does not have: Discord sends it no event for another member.
        again = await guild.fetch_member(player)
        expect(made['role'].id in [r.id for r in again.roles], f'roles after PUT: {again.roles}')

    async def remove_role() -> None:
        await made['member'].remove_roles(made['role'])
        again = await guild.fetch_member(player)
        expect(made['role'].id not in [r.id for r in again.roles], f'roles after DELETE: {again.roles}')

    async def move() -> None:
        mark = rec.mark()
        await run.sim.voice(player, lobby.id)
        member, _, _ = await rec.until('the player in the lobby', 'voice_state_update',
                                       lambda m, b, a: m.id == player and a.channel == lobby, since=mark)
        mark = rec.mark()
        await member.move_to(made['channel'])
        _, before, after = await rec.until(
            'on_voice_state_update for the move', 'voice_state_update',
            lambda m, b, a: m.id == player, since=mark)
        expect((before.channel, after.channel) == (lobby, made['channel']),
               f'moved from {before.channel} to {after.channel}')
        made['voice_member'] = member

    async def disconnect() -> None:
        mark = rec.mark()
        await made['voice_member'].move_to(None)
        _, before, after = await rec.until(
            'on_voice_state_update for the disconnect', 'voice_state_update',
            lambda m, b, a: m.id == player, since=mark)
        expect((before.channel, after.channel) == (made['channel'], None),
               f'disconnected from {before.channel} to {after.channel}')

    async def delete_role() -> None:
        mark = rec.mark()
        role = made['role']
        await role.delete()
        await rec.until('on_guild_role_delete', 'guild_role_delete', lambda r: r.id == role.id, since=mark)
        expect(guild.get_role(role.id) is None, 'the role is still in the cache')

    async def delete_channel() -> None:
        mark = rec.mark()
        channel = made['channel']
        await channel.delete()
        await rec.until('on_guild_channel_delete', 'guild_channel_delete',
                        lambda c: c.id == channel.id, since=mark)
        expect(guild.get_channel(channel.id) is None, 'the channel is still in the cache')

    steps = [
        ('create a role (POST /guilds/{g}/roles): on_guild_role_create', create_role),
        ('the role colour sent in colors.primary_color lands', role_colour),
        ('edit the role (PATCH /guilds/{g}/roles/{r}): on_guild_role_update', edit_role),
        ('create a voice channel with overwrites in the category: on_guild_channel_create', create_channel),
        ('set an overwrite (PUT /channels/{c}/permissions/{r}): on_guild_channel_update', set_permissions),
        ('edit the overwrites (PATCH /channels/{c}): on_guild_channel_update', edit_overwrites),
        ('add a member role (PUT /guilds/{g}/members/{u}/roles/{r})', add_role),
        ('remove a member role (DELETE .../roles/{r})', remove_role),
        ('Member.move_to a channel (PATCH /guilds/{g}/members/{u}): on_voice_state_update', move),
        ('Member.move_to(None) disconnects: on_voice_state_update', disconnect),
        ('delete the role: on_guild_role_delete', delete_role),
        ('delete the channel: on_guild_channel_delete', delete_channel),
    ]
    for what, body in steps:
        await run.check(what, body)


async def first_calls(run: Run) -> None:
    """REST calls bots make first, beyond Coven's own."""
    client = await run.ready()
    state = await run.sim.state()
    gid = int(state['guild_id'])
    guild = client.get_guild(gid)
    rec = client.rec

    async def fetch_guild() -> None:
        got = await client.fetch_guild(gid)
        expect(got.id == gid and got.name == guild.name, f'fetched {got.id} {got.name!r}')
        expect(ids(r.id for r in got.roles) == ids(r['id'] for r in state['roles']),
               f'fetched roles {[r.id for r in got.roles]}')

    async def fetch_roles() -> None:
        got = await guild.fetch_roles()
        expect(ids(r.id for r in got) == ids(r['id'] for r in state['roles']), f'fetched roles {got}')

    async def fetch_user() -> None:
        uid = await run.sim.user('bramble')
        got = await client.fetch_user(uid)
        expect(got.id == uid and got.name == 'bramble', f'fetched {got.id} {got.name!r}')

    async def fetch_channel() -> None:
        lobby = int(state['lobby_id'])
        got = await client.fetch_channel(lobby)
        expect(got.id == lobby and got.name == 'Lobby', f'fetched {got!r}')

    async def fetch_guilds() -> None:
        got = {g.id: g async for g in client.fetch_guilds()}
        want = {int(g['id']): g for g in state['guilds'] if g['bot']}
        expect(sorted(got) == sorted(want), f'fetched guilds {sorted(got)}, the bot is in {sorted(want)}')
        # discord.py asks with_counts=true by default (client.py, `fetch_guilds`).
        counts = {gid: g.approximate_member_count for gid, g in got.items()}
        expect(all(counts[gid] == want[gid]['members'] for gid in want),
               f'approximate_member_count {counts} (with_counts=true); the sim has '
               f'{ {gid: g["members"] for gid, g in want.items()} }')

    async def fetch_channels() -> None:
        got = await guild.fetch_channels()
        expect(ids(c.id for c in got) == ids(c['id'] for c in state['channels'] if c.get('bot_can_view', True)),
               f'fetched channels {got}')

    async def fetch_member() -> None:
        got = await guild.fetch_member(client.user.id)
        expect(ids(r.id for r in got.roles if not r.is_default()) ==
               ids(next(m['roles'] for m in state['members'] if int(m['user_id']) == client.user.id)),
               f'the bot member has {got.roles}')

    async def edit_nick() -> None:
        mark = rec.mark()
        await guild.me.edit(nick='Coven (sim)')
        # Discord sends GUILD_MEMBER_UPDATE for the current user's own member whatever
        # the intents.
        _, after = await rec.until('on_member_update for the bot', 'member_update',
                                   lambda b, a: a.id == client.user.id, since=mark)
        expect(after.nick == 'Coven (sim)', f'the nick is {after.nick!r}')

    await run.check('Client.fetch_guild (GET /guilds/{g})', fetch_guild)
    await run.check('Guild.fetch_roles (GET /guilds/{g}/roles)', fetch_roles)
    await run.check('Client.fetch_user (GET /users/{u})', fetch_user)
    await run.check('Client.fetch_channel (GET /channels/{c})', fetch_channel)
    await run.check('Client.fetch_guilds (GET /users/@me/guilds?with_counts=true)', fetch_guilds)
    await run.check('Guild.fetch_channels (GET /guilds/{g}/channels)', fetch_channels)
    await run.check('Guild.fetch_member (GET /guilds/{g}/members/{u})', fetch_member)
    await run.check('Guild.me.edit(nick=) (PATCH /guilds/{g}/members/@me): on_member_update', edit_nick)


async def every_param(run: Run) -> None:
    """Documented JSON params of the routes the sim serves, each honoured with its
    dispatch or refused as Discord refuses it, never answered 200 and dropped: Modify
    Guild Member's roles, mute, deaf and nick; Modify Channel's parent_id and bitrate;
    Modify Guild Channel Positions and Modify Guild Role Positions."""
    client = await run.ready()
    state = await run.sim.state()
    gid = int(state['guild_id'])
    guild = client.get_guild(gid)
    category = guild.get_channel(int(state['room_category_id']))
    lobby = guild.get_channel(int(state['lobby_id']))
    player = await run.sim.player('fable')
    rec = client.rec
    made: dict[str, Any] = {}

    async def roles() -> None:
        role = await guild.create_role(name='Regular', permissions=discord.Permissions.none())
        made['role'] = role
        member = await guild.fetch_member(player)
        await member.edit(roles=[role])
        again = await guild.fetch_member(player)
        expect([r.id for r in again.roles if not r.is_default()] == [role.id],
               f'PATCH roles=[{role.id}] answered, the member has {again.roles}')
        sim_roles = [m['roles'] for m in (await run.sim.state())['members'] if int(m['user_id']) == player]
        expect(sim_roles == [[str(role.id)]], f'the sim has {sim_roles}')

    async def mute_deaf() -> None:
        mark = rec.mark()
        await run.sim.voice(player, lobby.id)
        member, _, _ = await rec.until('the player in the lobby', 'voice_state_update',
                                       lambda m, b, a: m.id == player and a.channel == lobby, since=mark)
        mark = rec.mark()
        await member.edit(mute=True, deafen=True)
        _, before, after = await rec.until(
            'on_voice_state_update with mute and deaf', 'voice_state_update',
            lambda m, b, a: m.id == player, since=mark)
        expect((after.mute, after.deaf) == (True, True),
               f'after PATCH mute/deaf the voice state says mute={after.mute} deaf={after.deaf}')
        expect(after.channel == lobby, f'the member moved to {after.channel}')

    async def nick_refused() -> None:
        # The bot has Change Nickname (its own) but not Manage Nicknames: Discord refuses
        # a nick for someone else with 403 50013.
        member = await guild.fetch_member(player)
        try:
            await member.edit(nick='Fabulous')
        except discord.Forbidden as e:
            expect(e.code == 50013, f'refused with code {e.code}, not 50013')
            return
        again = await guild.fetch_member(player)
        raise Failed(f'PATCH nick without Manage Nicknames was accepted; the nick is now {again.nick!r}')

    async def parent_and_bitrate() -> None:
        mark = rec.mark()
        await lobby.edit(category=category, bitrate=48000)
        _, after = await rec.until('on_guild_channel_update for the lobby', 'guild_channel_update',
                                   lambda b, a: a.id == lobby.id, since=mark)
        expect((after.category_id, after.bitrate) == (category.id, 48000),
               f'PATCH parent_id/bitrate answered; the lobby has parent {after.category_id}, '
               f'bitrate {after.bitrate}')

    async def channel_position() -> None:
        voice = await guild.create_voice_channel('Second')
        await rec.until('the new channel', 'guild_channel_create', lambda c: c.id == voice.id)
        mark = rec.mark()
        await voice.edit(position=0)
        await rec.until('on_guild_channel_update with position 0', 'guild_channel_update',
                        lambda b, a: a.id == voice.id and a.position == 0, since=mark)
        sim = [c for c in (await run.sim.state())['channels'] if int(c['id']) == voice.id]
        expect(sim and sim[0].get('position', 0) == 0, f'the sim has {sim}')

    async def role_position() -> None:
        other = await guild.create_role(name='Below')
        await rec.until('the new role', 'guild_role_create', lambda r: r.id == other.id)
        # A new role comes in at position 1 and moves no other (Create Guild Role fires
        # only GUILD_ROLE_CREATE; "roles with the same position are sorted by id"):
        # put Regular just above Below.
        at = {int(r['id']): r['position'] for r in (await run.sim.state())['roles']}
        role = made['role']
        want = at[other.id] + 1
        mark = rec.mark()
        await guild.edit_role_positions({role: want})
        await rec.until(f'on_guild_role_update with position {want}', 'guild_role_update',
                        lambda b, a: a.id == role.id and a.position == want, since=mark)

    await run.check("Member.edit(roles=) (Modify Guild Member's roles)", roles)
    await run.check('Member.edit(mute=, deafen=): on_voice_state_update with mute and deaf', mute_deaf)
    await run.check("Member.edit(nick=) without Manage Nicknames: 403 50013", nick_refused)
    await run.check('VoiceChannel.edit(category=, bitrate=) (Modify Channel): on_guild_channel_update', parent_and_bitrate)
    await run.check('VoiceChannel.edit(position=) (Modify Guild Channel Positions): on_guild_channel_update',
                    channel_position)
    await run.check('Guild.edit_role_positions (Modify Guild Role Positions): on_guild_role_update', role_position)


async def guild_lifecycle(run: Run) -> None:
    """A guild's outage and return (on_guild_unavailable / on_guild_available), the bot
    removed from a guild (on_guild_remove) and added to one through OAuth2's bot
    authorization (on_guild_join)."""
    client = await run.ready()
    state = await run.sim.state()
    rec = client.rec
    others = [g for g in state['guilds'] if g['bot'] and int(g['id']) != int(state['guild_id'])]
    outside = [g for g in state['guilds'] if not g['bot']]
    if not others or not outside:
        raise Failed(f'the sim needs a second guild with the bot and one without: {state["guilds"]}')
    gid = int(others[0]['id'])
    new = int(outside[0]['id'])

    async def outage() -> None:
        mark = rec.mark()
        await run.sim.ok('POST', f'/guilds/{gid}/outage', {'unavailable': True})
        (guild,) = await rec.until('on_guild_unavailable', 'guild_unavailable', lambda g: g.id == gid, since=mark)
        expect(guild.unavailable, 'the guild is not marked unavailable')
        mark = rec.mark()
        await run.sim.ok('POST', f'/guilds/{gid}/outage', {'unavailable': False})
        (back,) = await rec.until('on_guild_available', 'guild_available', lambda g: g.id == gid, since=mark)
        expect(not back.unavailable and back.name == others[0]['name'], f'back: {back!r}')

    async def removed() -> None:
        mark = rec.mark()
        await run.sim.ok('DELETE', f'/guilds/{gid}/bot')
        await rec.until('on_guild_remove', 'guild_remove', lambda g: g.id == gid, since=mark)
        expect(client.get_guild(gid) is None, 'the guild is still in the cache')

    async def added() -> None:
        # Whoever may manage the guild approves the bot (plain bot authorization).
        owner = (await run.sim.state(new))['owner_id']
        mark = rec.mark()
        params = {'client_id': str(state['client_id']), 'scope': 'bot', 'permissions': '0',
                  'guild_id': str(new), 'disable_guild_select': 'true', 'sim_user': str(owner)}
        async with run.sim.session.get(f'{run.sim.base}/oauth2/authorize', params=params,
                                       allow_redirects=False) as res:
            expect(res.status < 400, f'authorize answered {res.status}: {(await res.text())[:300]}')
        (guild,) = await rec.until('on_guild_join', 'guild_join', lambda g: g.id == new, since=mark)
        expect(guild.name == outside[0]['name'], f'joined {guild!r}')
        expect(guild.me is not None, 'the bot is not a member of the new guild in the cache')

    await run.check('an outage and the return of a guild: on_guild_unavailable, on_guild_available', outage)
    await run.check('the bot removed by an admin: on_guild_remove', removed)
    await run.check('the bot added through OAuth2 bot authorization: on_guild_join', added)


async def resume(run: Run) -> None:
    """op 7 RECONNECT: discord.py reconnects and RESUMEs (on_resumed), and every change
    made meanwhile arrives once, in order."""
    client = await run.ready()
    await voice_changes_survive(run, client, 'op 7', lambda: run.sim.ok('POST', '/gateway/reconnect'))


async def resume_after_op9(run: Run) -> None:
    """op 9 INVALID_SESSION d:true: discord.py closes and RESUMEs on a new socket."""
    client = await run.ready()
    await voice_changes_survive(run, client, 'op 9 d:true',
                                lambda: run.sim.ok('POST', '/gateway/invalidate', {'resumable': True}))


async def resume_after_close(run: Run) -> None:
    """The Gateway closes the socket with 4000 (resumable): discord.py RESUMEs."""
    client = await run.ready()
    await voice_changes_survive(run, client, 'close 4000',
                                lambda: run.sim.ok('POST', '/gateway/disconnect', {'code': 4000}))


async def voice_changes_survive(run: Run, client: discord.Client, cause: str,
                                trouble: Callable[[], Awaitable[Any]],
                                timeout: float = DEADLINE, quiet: bool = False) -> None:
    """Moves a player back and forth from before `trouble` until discord.py has resumed
    (`quiet`: only once after `trouble`, then none until the resume), then a few more;
    checks it resumed (not identified again) and got each move once, in order."""
    state = await run.sim.state()
    lobby = int(state['lobby_id'])
    player = await run.sim.player('dusk')
    rec = client.rec
    den = await run.sim.voice_channel('Den')
    before = await run.sim.gateway()
    session = client.ws.session_id
    sent: list[int] = []

    one_at_a_time = asyncio.Lock()

    async def move() -> None:
        async with one_at_a_time:
            to = den if sent and sent[-1] == lobby else lobby
            await run.sim.voice(player, to)
            sent.append(to)

    def replayed(since: int) -> int:
        """Moves discord.py got between losing the socket and RESUMED: the replay's."""
        names = [n for (n, _) in rec.events[since:]]
        if 'disconnect' not in names or 'resumed' not in names:
            return 0
        return names[names.index('disconnect'):names.index('resumed')].count('voice_state_update')

    async def go() -> None:
        mark = rec.mark()
        stop = asyncio.Event()
        rounds = 0
        replays: list[int] = []

        async def mover() -> None:
            while not stop.is_set():
                await move()
                await asyncio.sleep(0.01)

        if quiet:
            await move()
            await trouble()
            await move()
            await rec.until(f'on_resumed after {cause}', 'resumed', since=mark, timeout=timeout)
            rounds = 1
        else:
            moving = asyncio.create_task(mover())
            try:
                await asyncio.sleep(0.05)
                # Up to three rounds, until a move has reached discord.py through the
                # replay: one made right after the trouble (op 7, op 9, a close) comes
                # after it on the old socket, which discord.py stops reading there, or
                # to the detached session, so it arrives only replayed on RESUME
                # (unless discord.py's RESUME got to the sim first).
                while rounds < 3 and not any(replays):
                    since = rec.mark()
                    await trouble()
                    await move()
                    await rec.until(f'on_resumed after {cause}', 'resumed', since=since, timeout=timeout)
                    rounds += 1
                    replays.append(replayed(since))
            finally:
                stop.set()
                await moving
        # A few more after the resume: the session goes on live.
        for _ in range(3):
            await move()
        await rec.until('the last move', 'voice_state_update',
                        lambda m, b, a: m.id == player and len(got(mark)) >= len(sent), since=mark)
        moves = got(mark)
        expect(moves == sent, f'moves seen {moves}\n  moves made {sent}')
        print(f'INFO {run.name}: {rounds} RESUME(s); moves replayed in each: {replays}; '
              f'{len(sent)} moves in all', flush=True)
        expect(quiet or any(replays),
               f'in {rounds} rounds no move reached discord.py through the replay (each came '
               'live), so the replay went untested')
        expect(rec.seen('ready', mark) == [], f'a new READY came ({rec.summary(mark)})')
        expect(client.ws.session_id == session, 'the session id changed')
        after = await run.sim.gateway()
        expect(after['resumes'] == before['resumes'] + rounds and after['identifies'] == before['identifies'],
               f'{rounds} RESUME(s); the sim counts resumes {before["resumes"]} -> {after["resumes"]}, '
               f'identifies {before["identifies"]} -> {after["identifies"]}')

    def got(mark: int) -> list[int]:
        return [a.channel.id for (m, b, a) in rec.seen('voice_state_update', mark)
                if m.id == player and a.channel is not None]

    await run.check(f'{cause}: on_resumed, the same session, every move once and in order', go,
                    timeout=timeout + DEADLINE)


async def reidentify(run: Run) -> None:
    """op 9 INVALID_SESSION d:false: discord.py drops the session and identifies again
    (after its own 5 s wait between IDENTIFYs): a new READY and the guilds again."""
    client = await run.ready()
    rec = client.rec
    before = await run.sim.gateway()
    session = client.ws.session_id
    state = await run.sim.state()

    async def go() -> None:
        mark = rec.mark()
        await run.sim.ok('POST', '/gateway/invalidate', {'resumable': False})
        await rec.until('a second on_ready', 'ready', since=mark, timeout=DEADLINE + 5)
        expect(client.ws.session_id and client.ws.session_id != session,
               f'session {session} -> {client.ws.session_id}')
        after = await run.sim.gateway()
        expect(after['identifies'] == before['identifies'] + 1,
               f'identifies {before["identifies"]} -> {after["identifies"]}')
        expect(after['identify_rejected'] == before['identify_rejected'],
               'an IDENTIFY was refused (too early for its bucket)')
        want = ids(g['id'] for g in state['guilds'] if g['bot'])
        expect(ids(g.id for g in client.guilds) == want, f'guilds after READY {client.guilds}')

    await run.check('op 9 d:false: a new session and READY', go, timeout=DEADLINE + 20)

    async def live() -> None:
        mark = rec.mark()
        player = await run.sim.player('ember')
        await run.sim.voice(player, int(state['lobby_id']))
        await rec.until('a voice update on the new session', 'voice_state_update',
                        lambda m, b, a: m.id == player, since=mark)

    await run.check('the new session gets dispatches', live)


async def rate_limit(run: Run, scope: str) -> None:
    """A 429 of `scope` (user: the route's bucket; global; shared): discord.py waits
    `retry_after` and retries, and the call succeeds once."""
    client = await run.ready()
    rec = client.rec
    state = await run.sim.state()
    guild = client.get_guild(int(state['guild_id']))
    retry_after = 1.5

    async def go() -> None:
        fault = {'method': 'POST', 'path': '/guilds/*/roles', 'status': 429, 'retry_after': retry_after}
        if scope == 'global':
            fault['global'] = True
        elif scope == 'shared':
            fault['scope'] = 'shared'
        await run.sim.fail(fault)
        mark = rec.mark()
        before = len((await run.sim.state())['roles'])
        started = time.monotonic()
        with LogWatch('discord.http', 'responded with 429') as limited:
            role = await guild.create_role(name=f'{scope} 429')
        took = time.monotonic() - started
        expect(limited.event.is_set(), 'discord.py never saw the 429')
        expect(took >= retry_after - 0.05, f'the call came back after {took:.2f}s, before retry_after')
        await rec.until('on_guild_role_create', 'guild_role_create', lambda r: r.id == role.id, since=mark)
        roles = (await run.sim.state())['roles']
        expect(len(roles) == before + 1, f'{len(roles) - before} roles made, not 1')

    await run.check(f'a {scope} 429 is waited out and the call succeeds once', go)

    if scope == 'global':
        async def others_wait() -> None:
            # A global 429 holds every route: a call to another route made while the
            # first one waits goes out only after the global limit is over.
            await run.sim.fail({'method': 'POST', 'path': '/guilds/*/roles', 'status': 429,
                                'retry_after': retry_after, 'global': True})
            started = time.monotonic()
            with LogWatch('discord.http', 'Global rate limit has been hit') as hit:
                first = asyncio.create_task(guild.create_role(name='global 429 again'))
                try:
                    await asyncio.wait_for(hit.wait(), DEADLINE)
                except asyncio.TimeoutError:
                    raise Failed('discord.py never logged the global rate limit') from None
            lobby = int(state['lobby_id'])
            await client.fetch_channel(lobby)
            took = time.monotonic() - started
            await first
            expect(took >= retry_after - 0.05,
                   f'a call to another route came back {took:.2f}s after the global 429 began')

        await run.check('another route waits while a global 429 lasts', others_wait)


class LogWatch(logging.Handler):
    """Notices a discord.py log line (what it says it does, read, not changed)."""

    def __init__(self, logger: str, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.logger = logging.getLogger(logger)
        self.text = text
        self.event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()

    async def wait(self) -> None:
        await self.event.wait()

    def __enter__(self) -> 'LogWatch':
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.logger.removeHandler(self)


async def zombie(run: Run) -> None:
    """The Gateway stops acknowledging heartbeats: discord.py notices (nothing received
    for `heartbeat_timeout`, a documented Client option, set short here), reconnects and
    RESUMEs without losing a dispatch."""
    # An IDENTIFY refused as too early makes discord.py wait 5 s with the socket unread,
    # longer than this heartbeat_timeout: start once the bucket is free (it is on a
    # fresh simulator; a reused one may have seen an IDENTIFY just now).
    await run.sim.identify_bucket_free()
    client = await run.ready(heartbeat_timeout=3.0)
    await voice_changes_survive(
        run, client, 'zombied connection',
        lambda: run.sim.ok('POST', '/gateway/zombie'), timeout=DEADLINE + 5, quiet=True)


async def two_shards(run: Run) -> None:
    """AutoShardedClient with the shard count from GET /gateway/bot (two): both shards
    ready, each guild on the shard of Discord's formula, its events on that shard."""
    state = await run.sim.state()
    client: Optional[discord.AutoShardedClient] = None

    async def ready() -> None:
        nonlocal client
        # discord.py waits 5 s before each IDENTIFY after the first (before_identify_hook).
        client = await run.ready(ShardedBot, timeout=DEADLINE + 10)
        expect(client.shard_count == 2, f'shard_count {client.shard_count} (GET /gateway/bot)')
        shards = sorted(s for (s,) in client.rec.seen('shard_ready'))
        expect(shards == [0, 1], f'shards ready: {shards}')
        sessions = (await run.sim.gateway())['sessions']
        held = sorted(tuple(s['shard']) for s in sessions if s['connected'] and s['shard'])
        expect(held == [(0, 2), (1, 2)], f'the sim holds sessions {sessions}')

    if not await run.check('both shards ready', ready, timeout=DEADLINE + 20):
        return

    async def placement() -> None:
        want = {int(g['id']): g['shard'] for g in state['guilds'] if g['bot']}
        expect(set(want) == {g.id for g in client.guilds}, f'guilds {client.guilds}, want {want}')
        for gid, shard in want.items():
            expect((gid >> 22) % 2 == shard, f'the sim puts {gid} on shard {shard}')
            guild = client.get_guild(gid)
            expect(guild.shard_id == shard, f'{guild.name} on shard {guild.shard_id}, not {shard}')
            # The sim's session of that shard carries the guild: a channel made in it
            # raises that session's sequence, not the other's, and discord.py gets it.
            seqs = await shard_sequences(run)
            mark = client.rec.mark()
            channel = await guild.create_text_channel(f'shard-{shard}-check')
            await client.rec.until(f'on_guild_channel_create in {guild.name}', 'guild_channel_create',
                                   lambda c: c.id == channel.id, since=mark)
            now = await shard_sequences(run)
            expect(now[shard] == seqs[shard] + 1 and now[1 - shard] == seqs[1 - shard],
                   f'{guild.name}: shard sequences {seqs} -> {now}; expected only shard {shard} to move')

    await run.check('each guild on the shard (guild_id >> 22) % 2, its events on that shard', placement)


async def shard_sequences(run: Run) -> dict[int, int]:
    """The last sequence number of each `[i, 2]` session, as the simulator reports it."""
    sessions = (await run.sim.gateway())['sessions']
    return {s['shard'][0]: s['last_sequence'] for s in sessions if s['shard']}


SCENARIOS: dict[str, Callable[[Run], Awaitable[None]]] = {
    'login_and_cache': login_and_cache,
    'voice_updates': voice_updates,
    'rest_with_dispatches': rest_with_dispatches,
    'first_calls': first_calls,
    'every_param': every_param,
    'guild_lifecycle': guild_lifecycle,
    'resume': resume,
    'resume_after_op9': resume_after_op9,
    'resume_after_close': resume_after_close,
    'reidentify': reidentify,
    'rate_limit_route': lambda run: rate_limit(run, 'user'),
    'rate_limit_global': lambda run: rate_limit(run, 'global'),
    'rate_limit_shared': lambda run: rate_limit(run, 'shared'),
    'zombie': zombie,
    'two_shards': two_shards,
}


async def run_scenario(name: str, sim_url: str, token: str) -> bool:
    async with aiohttp.ClientSession() as session:
        run = Run(name, Sim(sim_url, session), token)
        try:
            await SCENARIOS[name](run)
        except Failed as e:
            run.fail('setup', str(e))
        except Exception as e:
            run.fail('setup', ''.join(traceback.format_exception(type(e), e, e.__traceback__)))
        finally:
            await run.close()
        for client in run.clients:
            for event, tb in ((a[0], a[1]) for a in client.rec.seen('error')):
                run.fail(f'no error in an event handler ({event})', tb)
        ok = run.passed
        print(f'RESULT {name} {"passed" if ok else "failed"}', flush=True)
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--sim', help='the simulator base URL, e.g. http://127.0.0.1:3100')
    parser.add_argument('--token', default='sim-bot-token', help="the bot's token")
    parser.add_argument('--list', action='store_true', help='print the scenarios')
    parser.add_argument('--debug', action='store_true', help="discord.py's debug log on stderr")
    parser.add_argument('scenarios', nargs='*')
    args = parser.parse_args()
    if args.list:
        print('\n'.join(SCENARIOS))
        return 0
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if not args.sim or not args.scenarios or unknown:
        parser.error(f'--sim and known scenarios are needed (unknown: {unknown}); --list lists them')
    discord.utils.setup_logging(
        level=logging.DEBUG if args.debug else logging.INFO,
        formatter=logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'),
        root=True,
    )
    point_at(args.sim)
    # Which transport compression discord.py asks for (read, never set): zstd-stream where
    # it has zstd (the `zstandard` package, or Python 3.14), zlib-stream otherwise.
    print(f'INFO compression {discord.utils._ActiveDecompressionContext.COMPRESSION_TYPE}', flush=True)
    ok = True
    for name in args.scenarios:
        ok = asyncio.run(run_scenario(name, args.sim, args.token)) and ok
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
