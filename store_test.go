package batch

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// otherKey is a second credentials_key, hex.
const otherKey = "a1a2a3a4a5a6a7a8a9aaabacadaeafb0b1b2b3b4b5b6b7b8b9babbbcbdbebfc0"

// findInFiles returns the files under dir that contain any of secrets.
func findInFiles(t *testing.T, dir string, secrets ...string) []string {
	t.Helper()
	var found []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		buf, err := os.ReadFile(p)
		if err != nil {
			return nil // gone meanwhile
		}
		for _, s := range secrets {
			if bytes.Contains(buf, []byte(s)) {
				found = append(found, strings.TrimPrefix(p, dir)+" holds "+s)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return found
}

// With a credentials key, storage never holds in clear what a job's
// operations inherit, nor its operations; the operations still reach the
// backend with them.
func TestCredentialsStoredEncrypted(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, `{
		async {
			credentials_key `+testKey+`
		}
	}`), inStorage(storage))
	secrets := []string{"s3cr3t-token", "cookie-v4lue", "op-s3cret-key"}
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?d=20ms&id=c%d","headers":{"X-Api-Key":"op-s3cret-key"}}`, i))
	}
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]",
		"Authorization: Bearer s3cr3t-token", "Cookie: session=cookie-v4lue", "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "the job running", func() bool { return len(be.eventLog()) > 2 })
	if found := findInFiles(t, storage, secrets...); len(found) > 0 {
		t.Errorf("storage holds credentials in clear while the job runs: %v", found)
	}
	waitJob(t, base+"/batch/"+id, "Authorization: Bearer s3cr3t-token", "completed")
	if found := findInFiles(t, storage, secrets...); len(found) > 0 {
		t.Errorf("storage holds credentials in clear: %v", found)
	}
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, "/slow") && (r.Header.Get("Authorization") != "Bearer s3cr3t-token" ||
			r.Header.Get("Cookie") != "session=cookie-v4lue" || r.Header.Get("X-Api-Key") != "op-s3cret-key") {
			t.Errorf("operation sent without its credentials: %v", r.Header)
		}
	}
}

// A job resumed under a key that does not open what it stored fails with
// a clear error, and sends nothing without its credentials; the old key
// kept beside a new one opens it.
func TestCredentialsWrongKeyFailsJob(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := func(keys string) []byte {
		return adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		async {
			credentials_key `+keys+`
			lease 1s
		}
	}`)))
	}
	start := func(keys string) string {
		t.Helper()
		var ops []string
		for i := range 30 {
			ops = append(ops, fmt.Sprintf(`{"path":"/slow?d=30ms&id=w%d"}`, i))
		}
		base := loadCaddy(t, cfg(keys), port)
		id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
		n := len(be.eventLog())
		eventually(t, 10*time.Second, "the job running", func() bool { return len(be.eventLog()) > n+4 })
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		return id
	}

	id := start(testKey)
	before := len(be.requests())
	base := loadCaddy(t, cfg(otherKey), port)
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "error" || !strings.Contains(p.Get("error").String(), "cannot resume: cannot decrypt") ||
		!strings.Contains(p.Get("error").String(), "not configured") {
		t.Errorf("job resumed under the wrong key: %s", p.Raw)
	}
	if n := len(be.requests()); n != before {
		t.Errorf("%d operations sent after the key changed", n-before)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}

	id = start(testKey)
	base = loadCaddy(t, cfg(otherKey+" "+testKey), port)
	if p := waitJob(t, base+"/batch/"+id, alice, "completed", "error"); p.Get("status").String() != "completed" || p.Get("succeeded").Int() != 30 {
		t.Errorf("job resumed with the old key kept: %s", p.Raw)
	}
}

// Without a credentials key, a job whose operations carry a credential in
// their own headers is refused, in every format: storage holds a job's
// operations as sent, and would hold it in clear. Nothing is stored.
func TestOperationCredentialsRefusedWithoutKey(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, ""), inStorage(storage))
	const token = "op-t0ken-in-clear"
	cases := []struct {
		name, ctype, body, want string
	}{
		{"native", "application/json", `[{"path":"/health"},{"path":"/users","headers":{"Authorization":"Bearer ` + token + `"}}]`,
			`"index":1,"id":"1","message":"header Authorization may carry a credential`},
		{"bulk", "application/json", `{"operation":{"path":"/users","headers":{"X-Api-Key":"` + token + `"}},"items":[{},{}]}`,
			"header X-Api-Key may carry a credential"},
		{"JSON batch", "application/json", `{"requests":[{"id":"a","method":"GET","url":"/users","headers":{"Cookie":"s=` + token + `"}}]}`,
			"header Cookie may carry a credential"},
		{"multipart", "multipart/mixed; boundary=b", "--b\r\nContent-Type: application/http\r\n\r\nGET /users HTTP/1.1\r\nX-Auth-Token: " + token + "\r\n\r\n--b--\r\n",
			"header X-Auth-Token may carry a credential"},
		{"NDJSON", "application/x-ndjson", "{\"path\":\"/health\"}\n{\"path\":\"/users\",\"headers\":{\"X-Functions-Key\":\"" + token + "\"}}\n",
			"line 2: header X-Functions-Key may carry a credential"},
	}
	for _, c := range cases {
		status, _, body := send(t, "POST", base+"/batch", c.body, alice, "Prefer: respond-async", "Content-Type: "+c.ctype)
		if status != 400 || !strings.Contains(body, c.want) || !strings.Contains(body, "credentials_key") {
			t.Errorf("%s: %d %s", c.name, status, body)
		}
	}
	if found := findInFiles(t, storage, token); len(found) > 0 {
		t.Errorf("storage holds the credential: %v", found)
	}
	if n := len(storedJobs(t, storage)); n != 0 {
		t.Errorf("%d jobs stored", n)
	}
	// Idempotency-Key and headers that carry none are an operation's own.
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health","headers":{"Idempotency-Key":"k","X-Source":"crm"}}]`, alice, "Prefer: respond-async")
	if status != 202 {
		t.Errorf("an operation without credentials: %d %s", status, body)
	}
}

func TestCredentialHeader(t *testing.T) {
	for name, want := range map[string]bool{
		"Authorization": true, "Proxy-Authorization": true, "Cookie": true, "X-Api-Key": true, "X-Apikey": true,
		"X-Auth-Token": true, "X-Amz-Security-Token": true, "Ocp-Apim-Subscription-Key": true, "X-Session-Id": true,
		"X-Client-Secret": true, "X-Hub-Signature": true, "X-Password": true,
		"Idempotency-Key": false, "Content-Type": false, "X-Source": false, "Accept": false, "If-Match": false, "X-Request-Id": false,
	} {
		if got := credentialHeader(name); got != want {
			t.Errorf("credentialHeader(%q) = %v", name, got)
		}
	}
}
