package batch

import (
	"crypto/pbkdf2"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/crypto/bcrypt"
)

// Nothing is stored or read under an empty owner: every anonymous caller
// would share it, and read each other's jobs and replayed answers.
func TestEmptyOwnerRefused(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	batch := `[{"method":"POST","path":"/users","body":{"name":"Anon"}}]`
	for name, headers := range map[string][]string{
		"async":           {"Prefer: respond-async"},
		"async field":     nil,
		"idempotency key": {"Idempotency-Key: k1"},
	} {
		body := batch
		if headers == nil {
			body = `{"async":true,"batch":` + batch + `}`
		}
		status, _, answer := send(t, "POST", base+"/batch", body, headers...)
		if status != 401 || !strings.Contains(answer, "{http.request.header.Authorization} is empty") {
			t.Errorf("%s without credentials: %d %s", name, status, answer)
		}
	}
	if n := len(be.requests()); n != 0 {
		t.Errorf("refused batches reached the backend %d times", n)
	}
	// A plain sync batch needs no owner.
	if status, _, body := send(t, "POST", base+"/batch", batch); status != 200 {
		t.Errorf("sync batch without credentials: %d %s", status, body)
	}
}

// With authentication ordered after batch (the default), the
// authenticated user is not known when batch runs: an owner read from it
// is empty, so jobs are refused rather than shared by everybody.
func TestOwnerFromAuthAfterBatchRefused(t *testing.T) {
	be := newBackend(t)
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	base := startCaddy(t, `
	batch /batch /batch/* {
		async {
			owner {http.auth.user.id}
		}
	}
	basic_auth {
		alice `+string(hash)+`
	}
	reverse_proxy `+be.addr())
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/users"}]`, "Authorization: Basic YWxpY2U6cHc=", "Prefer: respond-async")
	if status != 401 || !strings.Contains(body, "{http.auth.user.id} is empty") || !strings.Contains(body, "route before batch") {
		t.Errorf("submit: %d %s", status, body)
	}
}

// The README's pattern for owners from authentication: the job paths in a
// route that authenticates before batch.
func TestOwnerFromAuthInRoute(t *testing.T) {
	be := newBackend(t)
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	base := startCaddy(t, `
	@batch path /batch /batch/*
	route @batch {
		basic_auth {
			alice `+string(hash)+`
			bob `+string(hash)+`
		}
		batch {
			async {
				owner {http.auth.user.id}
			}
		}
	}
	reverse_proxy `+be.addr())
	const aliceAuth, bobAuth = "Authorization: Basic YWxpY2U6cHc=", "Authorization: Basic Ym9iOnB3"
	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, aliceAuth, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	job := base + hdr.Get("Location")
	waitJob(t, job, aliceAuth, "completed")
	if status, _, body := send(t, "GET", job+"/results", "", aliceAuth); status != 200 || mustJSON(t, body).Get("results.0.status").Int() != 200 {
		t.Errorf("alice's results: %d %s", status, body)
	}
	if status, _, body := send(t, "GET", job, "", bobAuth); status != 404 {
		t.Errorf("bob reads alice's job: %d %s", status, body)
	}
	if status, _, _ := send(t, "GET", job, ""); status != 401 {
		t.Errorf("anonymous read: %d, want basic_auth's 401", status)
	}
}

// Cookie sessions: the owner is the session cookie, not the (absent)
// Authorization header.
func TestOwnerFromCookie(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		async {
			owner {http.request.cookie.session}
		}
	}`))
	const s1, s2 = "Cookie: session=one", "Cookie: session=two"
	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, s1, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	job := base + hdr.Get("Location")
	waitJob(t, job, s1, "completed")
	if status, _, _ := send(t, "GET", job, "", s2); status != 404 {
		t.Errorf("another session reads the job: %d", status)
	}
	if status, _, body := send(t, "GET", job, ""); status != 401 || !strings.Contains(body, "{http.request.cookie.session}") {
		t.Errorf("no session: %d %s", status, body)
	}
	// Keys belong to sessions: one session's key never replays for another.
	batch := `[{"method":"POST","path":"/users","body":{"name":"Kim"}}]`
	send(t, "POST", base+"/batch", batch, s1, "Idempotency-Key: k")
	if _, hdr, _ := send(t, "POST", base+"/batch", batch, s2, "Idempotency-Key: k"); hdr.Get("Idempotent-Replayed") != "" {
		t.Error("one session's Idempotency-Key replayed another's answer")
	}
	if _, hdr, _ := send(t, "POST", base+"/batch", batch, s1, "Idempotency-Key: k"); hdr.Get("Idempotent-Replayed") != "true" {
		t.Error("the session's own key was not replayed")
	}
}

// The README's route pattern: the batch path and its job paths in one
// route that authenticates and puts headers on the batch answer; polling
// a job stays inside it, and operations pass the route by.
func TestRouteWrappedBatch(t *testing.T) {
	be := newBackend(t)
	hash, _ := bcrypt.GenerateFromPassword([]byte("pw"), bcrypt.MinCost)
	base := startCaddy(t, `
	@batch path /batch /batch/*
	route @batch {
		header X-Content-Type-Options nosniff
		basic_auth {
			alice `+string(hash)+`
		}
		batch {
			async
		}
	}
	reverse_proxy `+be.addr())
	const auth = "Authorization: Basic YWxpY2U6cHc="
	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/users"}]`, auth, "Prefer: respond-async")
	if status != 202 || hdr.Get("X-Content-Type-Options") != "nosniff" {
		t.Fatalf("submit: %d %v %s", status, hdr, body)
	}
	job := base + hdr.Get("Location")
	waitJob(t, job, auth, "completed")
	status, hdr, body = send(t, "GET", job+"/results", "", auth)
	res := mustJSON(t, body)
	if status != 200 || hdr.Get("X-Content-Type-Options") != "nosniff" || res.Get("results.0.status").Int() != 200 ||
		res.Get("results.0.headers.X-Content-Type-Options").Exists() {
		t.Errorf("results: %d %v %s", status, hdr, body)
	}
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, "/batch") {
			t.Errorf("a job path reached the backend: %s", r.Path)
		}
	}
}

// Storage holds neither an owner's credentials nor a fast hash of them,
// which a dictionary reverses at once: a salted PBKDF2 hash. Jobs and
// idempotent answers stored with the older, unsalted hash still answer
// to their owner until they expire.
func TestOwnerStoredSaltedAndSlow(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, ""), inStorage(storage))
	const password = "Basic YWxpY2U6aHVudGVyMg==" // alice:hunter2
	auth := "Authorization: " + password
	id := mustJSON(t, func() string {
		_, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, auth, "Prefer: respond-async")
		return body
	}()).Get("id").String()
	waitJob(t, base+"/batch/"+id, auth, "completed")
	if status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, auth, "Idempotency-Key: once"); status != 200 {
		t.Fatalf("idempotent batch: %d", status)
	}
	fast := sha256.Sum256([]byte("caddy-batch owner\x00" + password))
	plain := sha256.Sum256([]byte(password))
	if found := findInFiles(t, storage, password, "hunter2", hex.EncodeToString(fast[:]), hex.EncodeToString(plain[:])); len(found) > 0 {
		t.Errorf("storage holds the credentials or a fast hash of them: %v", found)
	}
	var rec jobRecord
	buf, _ := os.ReadFile(filepath.Join(storage, "batch", "jobs", id, "job"))
	if err := json.Unmarshal(buf, &rec); err != nil || !strings.HasPrefix(rec.Owner, ownerHashPrefix) {
		t.Fatalf("owner stored as %q (%v)", rec.Owner, err)
	}
	salt, err := os.ReadFile(filepath.Join(storage, "batch", "owner_salt"))
	if err != nil || len(salt) != 32 {
		t.Fatalf("salt: %d bytes, %v", len(salt), err)
	}
	want, _ := pbkdf2.Key(sha256.New, password, salt, ownerIterations, sha256.Size)
	if rec.Owner != ownerHashPrefix+hex.EncodeToString(want) {
		t.Errorf("owner %s is not the salted PBKDF2 of the credentials", rec.Owner)
	}

	// A job stored before: its owner's unsalted hash.
	rec.Owner = hex.EncodeToString(fast[:])
	buf, _ = json.Marshal(rec)
	if err := os.WriteFile(filepath.Join(storage, "batch", "jobs", id, "job"), buf, 0o600); err != nil {
		t.Fatal(err)
	}
	if status, _, body := send(t, "GET", base+"/batch/"+id, "", auth); status != 200 {
		t.Errorf("a job stored with the older hash, to its owner: %d %s", status, body)
	}
	if status, _, _ := send(t, "GET", base+"/batch/"+id, "", "Authorization: Basic bWFsbG9yeTpodW50ZXIy"); status != 404 {
		t.Errorf("a job stored with the older hash, to another: %d", status)
	}
}
