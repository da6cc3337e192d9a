package batch

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net/http/httptest"
	"path"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
)

// What the list takes in its query, and what it refuses.
func TestListQuery(t *testing.T) {
	t.Parallel()
	name := indexName(time.Unix(1_800_000_000, 0), strings.Repeat("ab", 16))
	cursor := base64.RawURLEncoding.EncodeToString([]byte(name))
	ok := []struct {
		query string
		want  listQuery
	}{
		{"", listQuery{limit: 20}},
		{"limit=100&status=completed,stopped", listQuery{limit: 100, statuses: []string{"completed", "stopped"}}},
		{"cursor=" + cursor, listQuery{limit: 20, after: name}},
		{"metadata.source=crm&metadata.run=7", listQuery{limit: 20, metadata: map[string]string{"source": "crm", "run": "7"}}},
	}
	for _, tc := range ok {
		q, err := parseListQuery(httptest.NewRequest("GET", "/batch?"+tc.query, nil))
		if err != nil || q.limit != tc.want.limit || !slices.Equal(q.statuses, tc.want.statuses) || q.after != tc.want.after ||
			fmt.Sprint(q.metadata) != fmt.Sprint(tc.want.metadata) {
			t.Errorf("%s: %+v %v", tc.query, q, err)
		}
	}
	bad := map[string]string{
		"limit=0":           "limit must be a whole number from 1 to 100",
		"limit=101":         "limit must be",
		"limit=ten":         "limit must be",
		"status=done":       `unknown status "done"`,
		"status=completed,": `unknown status ""`,
		"cursor=!!!":        "cursor is not one this list gave",
		"cursor=" + base64.RawURLEncoding.EncodeToString([]byte("0-"+strings.Repeat("a", 32))): "cursor is not one",
		"cursor=" + base64.RawURLEncoding.EncodeToString([]byte("../../jobs/x")):               "cursor is not one",
		"offset=5":                  `unknown parameter "offset"`,
		"limit=5&limit=6":           "limit given twice",
		"metadata.k=a&metadata.k=b": "given twice",
		"metadata." + strings.Repeat("k", 65) + "=v": "longer than 64 bytes",
	}
	for query, want := range bad {
		if _, err := parseListQuery(httptest.NewRequest("GET", "/batch?"+query, nil)); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%.60s: %v", query, err)
		}
	}
	if id, ok := indexEntryID(name); !ok || id != strings.Repeat("ab", 16) {
		t.Errorf("entry %s: %s %v", name, id, ok)
	}
	// Newer jobs sort first.
	if older, newer := indexName(time.Unix(100, 0), strings.Repeat("0", 32)), indexName(time.Unix(101, 0), strings.Repeat("f", 32)); newer >= older {
		t.Errorf("%s sorts after %s", newer, older)
	}
}

// GET <batch path> lists the caller's jobs only, newest first, paged and
// filtered by status and metadata, reading the records of the caller's
// jobs and not of the 500 others' beside them.
func TestListJobs(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, ""), inStorage(storage), onLaggedStorage("0s"))
	bob := "Authorization: Bearer bob"
	var mine []string // oldest first
	for i := range 5 {
		source := "crm"
		if i >= 3 {
			source = "erp"
		}
		body := fmt.Sprintf(`{"metadata":{"source":%q,"run":"%d"},"batch":[{"path":"/health"}]}`, source, i)
		if i == 3 { // spends its budget: stopped
			body = `{"metadata":{"source":"erp","run":"3"},"max_failures":1,"batch":[{"path":"/users/900000"},{"path":"/health"}]}`
		}
		mine = append(mine, submitJob(t, base+"/batch", body))
	}
	var bobs []string
	for range 2 {
		status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, bob, "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("bob's job: %d %s", status, body)
		}
		bobs = append(bobs, mustJSON(t, body).Get("id").String())
	}
	for _, id := range mine {
		waitJob(t, base+"/batch/"+id, alice, stateCompleted, stateStopped)
		eventually(t, 10*time.Second, "the job recorded and let go", func() bool { return thePool(t).lookup(id) == nil })
	}
	for _, id := range bobs {
		waitJob(t, base+"/batch/"+id, bob, stateCompleted)
	}
	// 500 jobs of 50 other owners, indexed as the handler indexes them.
	fsys := &certmagic.FileStorage{Path: storage}
	for i := range 500 {
		rec := jobRecord{progress: progress{ID: fmt.Sprintf("%032x", i+1), Status: stateCompleted, Total: 1, Completed: 1, Succeeded: 1,
			CreatedAt: time.Now()}, Owner: fmt.Sprintf("v2:owner%d", i%50), ExpiresAt: time.Now().Add(time.Hour)}
		buf, _ := json.Marshal(rec)
		if err := fsys.Store(context.Background(), jobKey(rec.ID, "job"), buf); err != nil {
			t.Fatal(err)
		}
		if err := fsys.Store(context.Background(), indexKey(&rec), []byte(rec.ID)); err != nil {
			t.Fatal(err)
		}
	}

	list := func(auth, query string) (ids []string, next string) {
		t.Helper()
		status, _, body := send(t, "GET", base+"/batch"+query, "", auth)
		if status != 200 {
			t.Fatalf("list %s: %d %s", query, status, body)
		}
		res := mustJSON(t, body)
		for _, j := range res.Get("jobs").Array() {
			ids = append(ids, j.Get("id").String())
		}
		return ids, res.Get("next").String()
	}
	newestFirst := slices.Clone(mine)
	slices.Reverse(newestFirst)

	before := lagstore.Calls()
	ids, next := list(alice, "")
	calls := lagstore.Calls().Sub(before)
	if !slices.Equal(ids, newestFirst) || next != "" {
		t.Fatalf("alice's list: %v next %q, want %v", ids, next, newestFirst)
	}
	// A Load per job of alice's, and a List of her index (and of the one
	// under her older hash): the 500 other
	// jobs cost nothing. (The pacers' sharing may add a call or two.)
	if calls.Load > 8 || calls.List > 3 {
		t.Errorf("listing 5 jobs among 507 cost %+v", calls)
	}
	t.Logf("alice's 5 jobs among 507: %d loads, %d lists", calls.Load, calls.List)

	_, _, body := send(t, "GET", base+"/batch", "", alice)
	first := mustJSON(t, body).Get("jobs.0")
	if first.Get("metadata.source").String() != "erp" || first.Get("metadata.run").String() != "4" || first.Get("status").String() != stateCompleted {
		t.Errorf("the newest job: %s", first.Raw)
	}

	// Paged.
	var paged []string
	query := "?limit=2"
	for pages := 0; ; pages++ {
		ids, next := list(alice, query)
		paged = append(paged, ids...)
		if next == "" {
			if pages != 2 {
				t.Errorf("%d pages of 2 for 5 jobs", pages+1)
			}
			break
		}
		if pages == 5 {
			t.Fatal("the pages never end")
		}
		query = "?limit=2&cursor=" + next
	}
	if !slices.Equal(paged, newestFirst) {
		t.Errorf("paged: %v", paged)
	}

	// Filtered.
	filters := map[string][]string{
		"?status=stopped":                               {mine[3]},
		"?status=completed,stopped":                     newestFirst,
		"?status=running,queued":                        nil,
		"?metadata.source=crm":                          {mine[2], mine[1], mine[0]},
		"?metadata.source=crm&metadata.run=1":           {mine[1]},
		"?metadata.source=erp&status=completed":         {mine[4]},
		"?metadata.source=nope":                         nil,
		"?metadata.source=crm&limit=1&status=completed": {mine[2]},
	}
	for q, want := range filters {
		if ids, _ := list(alice, q); !slices.Equal(ids, want) {
			t.Errorf("%s: %v, want %v", q, ids, want)
		}
	}
	p := waitJob(t, base+"/batch/"+mine[3], alice, stateStopped)
	if p.Get("stop_reason").String() != stopFailureBudget || p.Get("metadata.run").String() != "3" {
		t.Errorf("the stopped job: %s", p.Raw)
	}
	_, _, body = send(t, "GET", base+"/batch/"+mine[0]+"/results", "", alice)
	if md := mustJSON(t, body).Get("metadata"); md.Get("source").String() != "crm" || md.Get("run").String() != "0" {
		t.Errorf("results summary without the job's metadata: %s", body)
	}

	// Nobody sees another's jobs, whatever cursor they bring.
	if ids, _ := list(bob, ""); len(ids) != 2 || !slices.Contains(ids, bobs[0]) || !slices.Contains(ids, bobs[1]) {
		t.Errorf("bob's list: %v", ids)
	}
	_, next = list(alice, "?limit=1")
	if ids, _ := list(bob, "?cursor="+next); slices.ContainsFunc(ids, func(id string) bool { return slices.Contains(mine, id) }) {
		t.Errorf("bob, with alice's cursor, sees %v", ids)
	}
	if ids, _ := list("Authorization: Bearer carol", ""); len(ids) != 0 {
		t.Errorf("a caller without jobs: %v", ids)
	}
	if status, _, _ := send(t, "GET", base+"/batch", ""); status != 401 {
		t.Errorf("no credentials: %d", status)
	}
	for _, q := range []string{"?status=done", "?limit=500", "?cursor=abc", "?metadata." + strings.Repeat("k", 65) + "=v", "?sort=asc"} {
		if status, _, body := send(t, "GET", base+"/batch"+q, "", alice); status != 400 || gjson.Get(body, "error").String() == "" {
			t.Errorf("%.40s: %d %s", q, status, body)
		}
	}
	if status, hdr, _ := send(t, "PUT", base+"/batch", "", alice); status != 405 || hdr.Get("Allow") != "GET, POST" {
		t.Errorf("PUT on the batch path: %d Allow %q", status, hdr.Get("Allow"))
	}
}

// The sweep keeps the index in step with the jobs: an expired job goes
// with its entry, an entry whose job is gone goes once it is older than a
// job lives, a young one stays (its job may be being stored), and a job
// without an entry (stored before there was an index) gets one.
func TestSweepKeepsIndexInStep(t *testing.T) {
	storage := t.TempDir()
	fsys := &certmagic.FileStorage{Path: storage}
	ctx := context.Background()
	mk := func(n int, created, expires time.Time) *jobRecord {
		rec := &jobRecord{progress: progress{ID: fmt.Sprintf("%032x", n), Status: stateCompleted, CreatedAt: created},
			Owner: "v2:someone", ExpiresAt: expires}
		return rec
	}
	store := func(key string, v any) {
		buf, _ := json.Marshal(v)
		if err := fsys.Store(ctx, key, buf); err != nil {
			t.Fatal(err)
		}
	}
	now := time.Now()
	expired := mk(1, now.Add(-5*time.Hour), now.Add(-time.Minute))
	store(jobKey(expired.ID, "job"), expired)
	store(indexKey(expired), expired.ID)
	orphanOld := mk(2, now.Add(-3*time.Hour), now)
	store(indexKey(orphanOld), orphanOld.ID)
	orphanYoung := mk(3, now, now)
	store(indexKey(orphanYoung), orphanYoung.ID)
	unindexed := mk(4, now.Add(-time.Hour), now.Add(time.Hour))
	store(jobKey(unindexed.ID, "job"), unindexed)
	store(path.Join(ownerIndex("v2:someone"), "junk"), "x")

	startCaddy(t, "batch /batch /batch/* {\n\tasync {\n\t\tretention 1h\n\t\twindow 1h\n\t}\n}\nrespond 404", inStorage(storage))
	exists := func(key string) bool { return fsys.Exists(ctx, key) }
	eventually(t, 10*time.Second, "the index swept", func() bool {
		return !exists(jobKey(expired.ID, "job")) && !exists(indexKey(expired)) && !exists(indexKey(orphanOld)) &&
			exists(indexKey(unindexed)) && !exists(path.Join(ownerIndex("v2:someone"), "junk"))
	})
	if !exists(indexKey(orphanYoung)) {
		t.Error("a young entry was swept: its job may be being stored")
	}
	if !exists(jobKey(unindexed.ID, "job")) {
		t.Error("a live job was swept")
	}
}

// An owner's folder of the index goes once its jobs have: on a file
// system it outlived them, one for every owner value ever sent.
func TestSweepDeletesEmptyOwnerFolders(t *testing.T) {
	setVar(t, &emptyIndexIdle, 0)
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, proxySite(be, `{
		async {
			retention 1s
			window 1s
		}
	}`), inStorage(storage))
	var ids []string
	for i := range 3 {
		status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`,
			fmt.Sprintf("Authorization: Bearer caller-%d", i), "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("submit: %d %s", status, body)
		}
		ids = append(ids, mustJSON(t, body).Get("id").String())
	}
	fsys := &certmagic.FileStorage{Path: storage}
	eventually(t, 30*time.Second, "the jobs and their owners' folders swept", func() bool {
		for _, id := range ids {
			if fsys.Exists(context.Background(), jobKey(id)) {
				return false
			}
		}
		owners, _ := fsys.List(context.Background(), ownersPrefix, false)
		return len(owners) == 0
	})
}

// A job stored under its owner's older (unsalted) hash is listed too: the
// sweep indexes it under that hash, which the list reads as well.
func TestListJobsUnderOlderOwnerHash(t *testing.T) {
	storage := t.TempDir()
	fsys := &certmagic.FileStorage{Path: storage}
	legacy := sha256.Sum256([]byte("caddy-batch owner\x00" + "Bearer alice"))
	rec := jobRecord{progress: progress{ID: strings.Repeat("ab", 16), Status: stateCompleted, Total: 1, Completed: 1, Succeeded: 1,
		CreatedAt: time.Now().Add(-time.Minute)}, Owner: hex.EncodeToString(legacy[:]), ExpiresAt: time.Now().Add(time.Hour)}
	buf, _ := json.Marshal(rec)
	if err := fsys.Store(context.Background(), jobKey(rec.ID, "job"), buf); err != nil {
		t.Fatal(err)
	}
	base := startCaddy(t, "batch /batch /batch/* {\n\tasync {\n\t\tretention 1h\n\t\twindow 1h\n\t}\n}\nrespond 404", inStorage(storage))
	eventually(t, 10*time.Second, "the job indexed", func() bool { return fsys.Exists(context.Background(), indexKey(&rec)) })
	if status, _, body := send(t, "GET", base+"/batch/"+rec.ID, "", alice); status != 200 {
		t.Fatalf("GET the job: %d %s", status, body)
	}
	_, _, body := send(t, "GET", base+"/batch", "", alice)
	if got := mustJSON(t, body).Get("jobs.#.id").String(); got != `["`+rec.ID+`"]` {
		t.Errorf("alice reads job %s, and her list is %s", rec.ID, body)
	}
	if _, _, body := send(t, "GET", base+"/batch", "", "Authorization: Bearer mallory"); mustJSON(t, body).Get("jobs.#").Int() != 0 {
		t.Errorf("another's list: %s", body)
	}
}
