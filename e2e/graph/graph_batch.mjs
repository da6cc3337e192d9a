// The Microsoft Graph JavaScript SDK (@microsoft/microsoft-graph-client 3.0.7),
// used as its documentation shows, against caddy-batch's JSON batch format
// in front of examples/legacyapi's users API.
//
//	node graph_batch.mjs http://127.0.0.1:8080/v1.0/$batch
//
// The SDK is pointed at the batch URL's directory as its service root
// (baseUrl + defaultVersion) and POSTs client.api("/$batch"). Step urls are
// written "/users/…": relative to the service root, as Graph wants them (so
// the Caddy in front must map <root>/users… onto the API's /users…). The
// SDK's default middleware adds Authorization only for https Graph hosts, so
// the client gets a chain of its own: a middleware setting a fixed
// Authorization header (GRAPH_TOKEN, default "ci"), then HTTPMessageHandler.
//
// Exits 0 when every answer is as expected, 1 with a message on the first
// mismatch, 2 on bad usage.

import { BatchRequestContent, BatchResponseContent, Client, GraphError, HTTPMessageHandler } from "@microsoft/microsoft-graph-client";

const batchArg = process.argv[2];
if (!batchArg) {
	console.error("usage: node graph_batch.mjs BATCH_URL   (e.g. http://127.0.0.1:8080/v1.0/$batch)");
	process.exit(2);
}
const batchURL = new URL(batchArg);
const cut = batchURL.pathname.lastIndexOf("/");
const serviceRoot = batchURL.pathname.slice(0, cut + 1); // "/v1.0/"
const batchSegment = batchURL.pathname.slice(cut + 1); // "$batch"
const token = process.env.GRAPH_TOKEN || "ci";

// Sets one Authorization header on every request it passes on.
class FixedAuthorization {
	constructor(value) {
		this.value = value;
	}
	async execute(context) {
		const opts = context.options;
		if (opts.headers instanceof Headers) {
			opts.headers.set("Authorization", this.value);
		} else {
			opts.headers = { ...(opts.headers || {}), Authorization: this.value };
		}
		return this.next.execute(context);
	}
	setNext(next) {
		this.next = next;
	}
}

const client = Client.initWithMiddleware({
	baseUrl: batchURL.origin + "/",
	defaultVersion: serviceRoot.replace(/^\/+|\/+$/g, ""),
	middleware: [new FixedAuthorization(`Bearer ${token}`), new HTTPMessageHandler()],
});

// Node's Request takes absolute URLs only; BatchRequestContent cuts the
// scheme and authority off and keeps the path: "/users/1".
const api = (path, init = {}) => new Request(batchURL.origin + path, init);
const jsonInit = (method, value) => ({
	method,
	headers: { "Content-Type": "application/json" },
	body: JSON.stringify(value),
});

let checks = 0;
function fail(message, extra) {
	console.error(`FAIL graph: ${message}`);
	if (extra !== undefined) console.error(typeof extra === "string" ? extra : JSON.stringify(extra, null, 2));
	process.exit(1);
}
function expect(cond, message, extra) {
	if (!cond) fail(message, extra);
	checks++;
}

async function send(content, what) {
	let answer;
	try {
		answer = await client.api("/" + batchSegment).post(await content.getContent());
	} catch (e) {
		fail(`${what}: the batch POST to ${batchURL} failed: ${e.statusCode ?? ""} ${e.code ?? e.name}: ${e.message}`, e.body);
	}
	if (!answer || !Array.isArray(answer.responses)) {
		fail(`${what}: the answer has no "responses" array (its Content-Type must be application/json)`, answer);
	}
	return { raw: answer, batch: new BatchResponseContent(answer) };
}

async function step(batch, id, status, what) {
	const res = batch.getResponseById(id);
	expect(res instanceof Response, `step ${id} (${what}): no response with that id`);
	if (res.status !== status) {
		fail(`step ${id} (${what}): status ${res.status}, want ${status}`, await res.text());
	}
	checks++;
	return res;
}

async function jsonOf(res, id) {
	const ct = res.headers.get("Content-Type") || "";
	expect(ct.split(";")[0] === "application/json", `step ${id}: Content-Type ${JSON.stringify(ct)}, want application/json`);
	const text = await res.text();
	try {
		return JSON.parse(text);
	} catch (e) {
		fail(`step ${id}: body is not JSON (headers["Content-Type"] must be spelled so for the SDK to re-serialize it): ${text}`);
	}
}

// 1. A seed user, so that the second batch has known ids to read and delete.
const seedBatch = new BatchRequestContent([
	{ id: "seed", request: api("/users", jsonInit("POST", { name: "Seed", email: "seed@example.com", balance: 1 })) },
]);
const seed = await send(seedBatch, "seed batch");
const seedRes = await step(seed.batch, "seed", 201, "POST /users");
const seedUser = await jsonOf(seedRes, "seed");
expect(Number.isInteger(seedUser.id) && seedUser.name === "Seed", "seed: body is not the created user", seedUser);
const S = seedUser.id;
const N = S + 1; // the API numbers users in order: the next create gets S+1

// 2. The batch under test: one serial dependsOn chain (the SDK accepts only
// parallel, serial, or all-on-one dependencies), a 404 in it, and the step
// after the 404 must come back 424 without having run.
const steps = [
	{ id: "create", request: api("/users", jsonInit("POST", { name: "Grace", email: "grace@example.com", balance: 10 })) },
	{ id: "read", request: api(`/users/${N}`, { method: "GET" }) },
	{ id: "patch", request: api(`/users/${N}`, jsonInit("PATCH", { balance: 25 })) },
	{ id: "list", request: api("/users", { method: "GET", headers: { Accept: "application/json" } }) },
	{ id: "delete", request: api(`/users/${S}`, { method: "DELETE" }) },
	{ id: "gone", request: api(`/users/${S}`, { method: "GET" }) },
	{ id: "after", request: api(`/users/${N}`, jsonInit("PATCH", { name: "Never" })) },
];
const content = new BatchRequestContent();
for (const s of steps) content.addRequest(s);
for (let i = 1; i < steps.length; i++) content.addDependency(steps[i].id, steps[i - 1].id);

const sent = await content.getContent();
expect(sent.requests[1].url === `/users/${N}` && sent.requests[1].dependsOn[0] === "create", "the SDK wrote the steps unexpectedly", sent);

const main = await send(content, "main batch");
expect(main.raw.responses.length === steps.length, `${main.raw.responses.length} responses, want ${steps.length}`, main.raw);
const order = main.raw.responses.map((r) => r.id);
expect(JSON.stringify(order) === JSON.stringify(steps.map((s) => s.id)), `responses in order ${order}, want request order`);

const all = main.batch.getResponses();
expect(all instanceof Map && all.size === steps.length, `getResponses() has ${all.size} entries, want ${steps.length}`);
for (const s of steps) expect(all.has(s.id), `getResponses() lacks ${s.id}`);

const created = await jsonOf(await step(main.batch, "create", 201, "POST /users"), "create");
expect(created.id === N && created.name === "Grace" && created.balance === 10, `create: got ${JSON.stringify(created)}, want user ${N} "Grace" (is another client using the API?)`);
expect(main.batch.getResponseById("create").headers.get("Location") === `/users/${N}`, "create: Location header", Object.fromEntries(main.batch.getResponseById("create").headers));

const read = await jsonOf(await step(main.batch, "read", 200, `GET /users/${N}`), "read");
expect(read.id === N && read.name === "Grace" && read.email === "grace@example.com", "read: not the created user", read);

const patched = await jsonOf(await step(main.batch, "patch", 200, `PATCH /users/${N}`), "patch");
expect(patched.balance === 25 && patched.name === "Grace", "patch: not applied", patched);

const list = await jsonOf(await step(main.batch, "list", 200, "GET /users"), "list");
const listed = new Set((list.data || []).map((u) => u.id));
expect(listed.has(S) && listed.has(N), `list: users ${S} and ${N} missing`, list);

const deleted = await step(main.batch, "delete", 204, `DELETE /users/${S}`);
expect((await deleted.text()) === "", "delete: a 204 with a body");

const gone = await jsonOf(await step(main.batch, "gone", 404, `GET /users/${S}`), "gone");
expect(gone.error === "no such user", "gone: not the API's 404 body", gone);

await step(main.batch, "after", 424, "PATCH after a failed dependency");

// 3. The step answered 424 must not have run: user N keeps its name.
const check = await send(new BatchRequestContent([{ id: "check", request: api(`/users/${N}`) }]), "check batch");
const after = await jsonOf(await step(check.batch, "check", 200, `GET /users/${N}`), "check");
expect(after.name === "Grace" && after.balance === 25, "the 424 step ran anyway", after);

// 4. A whole-batch error reaches the SDK as a GraphError built from
// {"error":{"code","message"}}: two steps with one id.
try {
	await client.api("/" + batchSegment).post({
		requests: [
			{ id: "1", method: "GET", url: "/users" },
			{ id: "1", method: "GET", url: "/health" },
		],
	});
	fail("a batch with a duplicate id was accepted");
} catch (e) {
	expect(e instanceof GraphError, `duplicate id: ${e.name}: ${e.message}`);
	expect(e.statusCode === 400, `duplicate id: status ${e.statusCode}, want 400`, e.body);
	expect(typeof e.code === "string" && e.code !== "" && typeof e.message === "string" && e.message !== "", 'duplicate id: no {"error":{"code","message"}} in the answer', e.body);
}

console.log(`graph: every answer from ${batchURL} as expected`);
console.log(`graph: ${checks} passed, 0 failed`);
