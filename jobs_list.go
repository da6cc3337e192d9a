package batch

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math"
	"net/http"
	"path"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// GET <batch path> lists the caller's jobs, newest first. Each owner's
// jobs are indexed in storage under batch/owners/<owner key>/, one key a
// job named <reverse creation time>-<id>, so that a List of the caller's
// folder, sorted, is newest first, and a page costs a List of the
// caller's own jobs and a Load of each job it looks at: never a scan of
// every job. An entry is written before the job's record is, and deleted
// with the job; an entry whose job is gone is passed over, and the sweep
// deletes it; a job whose entry is missing (stored before there was an
// index) gets one at the next sweep.

// ownersPrefix is where the owners' indexes of jobs live.
const ownersPrefix = "batch/owners"

// Bounds of a page of the list.
const (
	defaultListLimit = 20
	maxListLimit     = 100
	// maxListScan bounds the records one page reads: a filter that
	// matches few of many jobs answers a short page with a next cursor.
	maxListScan = 1000
)

// ownerIndex is the folder of an owner's index: a hash of its owner hash,
// which is fixed in length and safe in any storage's key.
func ownerIndex(owner string) string {
	sum := sha256.Sum256([]byte("caddy-batch index\x00" + owner))
	return path.Join(ownersPrefix, hex.EncodeToString(sum[:16]))
}

// indexName is the name of a job's entry in its owner's index: names sort
// newest first.
func indexName(created time.Time, id string) string {
	return fmt.Sprintf("%019d-%s", math.MaxInt64-created.UnixNano(), id)
}

// indexEntryID returns the job id of an entry's name; ok is false for a
// name that is no entry.
func indexEntryID(name string) (id string, ok bool) {
	rev, id, found := strings.Cut(name, "-")
	if !found || len(rev) != 19 || strings.Trim(rev, "0123456789") != "" || !isJobID(id) {
		return "", false
	}
	return id, true
}

func indexKey(rec *jobRecord) string {
	return path.Join(ownerIndex(rec.Owner), indexName(rec.CreatedAt, rec.ID))
}

// indexJob lists a job in its owner's index.
func (s *store) indexJob(ctx context.Context, rec *jobRecord) error {
	return s.Store(ctx, indexKey(rec), []byte(rec.ID))
}

// unindexJob takes a job out of its owner's index.
func (s *store) unindexJob(ctx context.Context, rec *jobRecord) {
	if err := s.Delete(ctx, indexKey(rec)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.logger.Warn("deleting the index entry of an async batch", zap.String("id", rec.ID), zap.Error(err))
	}
}

// listQuery is what a request for the list asks for.
type listQuery struct {
	statuses []string
	limit    int
	after    string // the index name the page starts after; "" for the first
	metadata map[string]string
}

// jobStatuses are the statuses a job may have, for ?status=.
var jobStatuses = []string{stateQueued, stateRunning, stateCompleted, stateError, stateCanceled, stateStopped, stateExpired}

// parseListQuery reads the query of a request for the list; the error
// says what is wrong with it.
func parseListQuery(r *http.Request) (listQuery, error) {
	q := r.URL.Query()
	lq := listQuery{limit: defaultListLimit}
	for name, vals := range q {
		if strings.HasPrefix(name, metadataQueryPrefix) {
			continue
		}
		if len(vals) > 1 {
			return lq, fmt.Errorf("%s given twice", short(name))
		}
		v := vals[0]
		switch name {
		case "status":
			for _, st := range strings.Split(v, ",") {
				if !slices.Contains(jobStatuses, st) {
					return lq, fmt.Errorf("unknown status %q: a job is %s", short(st), strings.Join(jobStatuses, ", "))
				}
				lq.statuses = append(lq.statuses, st)
			}
		case "limit":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxListLimit {
				return lq, fmt.Errorf("limit must be a whole number from 1 to %d", maxListLimit)
			}
			lq.limit = n
		case "cursor":
			raw, err := base64.RawURLEncoding.DecodeString(v)
			if _, ok := indexEntryID(string(raw)); err != nil || !ok {
				return lq, errors.New("cursor is not one this list gave")
			}
			lq.after = string(raw)
		default:
			return lq, fmt.Errorf("unknown parameter %q: the list takes status, limit, cursor and metadata.<key>", short(name))
		}
	}
	md, msg := queryMetadata(q)
	if msg != "" {
		return lq, errors.New(msg)
	}
	lq.metadata = md
	return lq, nil
}

// matches reports whether a job's progress is what q asks for.
func (q *listQuery) matches(p *progress) bool {
	if len(q.statuses) > 0 && !slices.Contains(q.statuses, p.Status) {
		return false
	}
	for k, v := range q.metadata {
		if got, ok := p.Metadata[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// list answers GET <batch path>: {"jobs":[progress…],"next":"<cursor>"},
// the caller's jobs newest first; next is absent on the last page.
func (a *asyncJobs) list(w http.ResponseWriter, r *http.Request) error {
	who, err := a.h.owners.of(r)
	if err != nil {
		return a.h.owners.refuse(w, native, err)
	}
	lq, err := parseListQuery(r)
	if err != nil {
		return writeError(w, http.StatusBadRequest, err.Error())
	}
	ctx := r.Context()
	var names []string
	// Jobs stored under the owner's older hash are indexed under it.
	for _, owner := range []string{who.hash, who.legacy} {
		keys, err := a.store.List(ctx, ownerIndex(owner), false)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("listing batch jobs: %w", err))
		}
		for _, k := range keys {
			if name := path.Base(k); name > lq.after {
				if _, ok := indexEntryID(name); ok {
					names = append(names, name)
				}
			}
		}
	}
	slices.Sort(names)
	jobs := make([]progress, 0, min(lq.limit, len(names)))
	next := ""
	for i, name := range names {
		if len(jobs) == lq.limit || i == maxListScan {
			next = names[i-1]
			break
		}
		id, _ := indexEntryID(name)
		rec, found, err := a.lookupJob(ctx, id)
		switch {
		case err != nil:
			return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("loading batch job: %w", err))
		case !found || !who.is(rec.Owner) || now().After(rec.ExpiresAt) || !lq.matches(&rec.progress):
			// Gone (its entry is swept), another's (no index leads
			// there, but it stays unseen), expired, or not asked for.
			continue
		}
		jobs = append(jobs, rec.progress)
	}
	buf, err := json.Marshal(struct {
		Jobs []progress `json:"jobs"`
		Next string     `json:"next,omitempty"`
	}{jobs, cursorOf(next)})
	if err != nil {
		return err
	}
	writeJSON(w, http.StatusOK, buf)
	return nil
}

// cursorOf is the cursor of the page after the entry name; "" for none.
func cursorOf(name string) string {
	if name == "" {
		return ""
	}
	return base64.RawURLEncoding.EncodeToString([]byte(name))
}

// lookupJob returns the record of job id as this instance knows it: its
// own if it queues, runs or holds it, else storage's; found is false when
// there is no such job, or its record cannot be read.
func (a *asyncJobs) lookupJob(ctx context.Context, id string) (rec jobRecord, found bool, err error) {
	if j := a.pool.lookup(id); j != nil && j.a.store == a.store {
		return j.snapshot(), true, nil
	}
	rec, err = a.store.loadJob(ctx, id)
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, errBadRecord):
		return rec, false, nil
	case err != nil:
		return rec, false, err
	}
	return rec, true, nil
}

// emptyIndexIdle is how long an owner's folder of the index stays empty
// before the sweep deletes it: one whose first entry is being written is
// not.
var emptyIndexIdle = time.Minute

// sweepOwnerDir deletes dir, an owner's folder of the index that was found
// empty: on a file system it outlives its entries, one for every owner
// that ever submitted a job. Should an entry be written meanwhile, it goes
// with the folder, and the sweep writes it again (reindex).
func (a *asyncJobs) sweepOwnerDir(ctx context.Context, dir string) {
	info, err := a.store.Stat(ctx, dir)
	if err != nil || info.IsTerminal || now().Sub(info.Modified) < emptyIndexIdle {
		return
	}
	if err := a.store.Delete(ctx, dir); err != nil && !errors.Is(err, fs.ErrNotExist) {
		a.logger.Warn("deleting an empty folder of the owners' index", zap.String("key", dir), zap.Error(err))
	}
}

// sweepIndex deletes the entries of the owners' indexes whose job is gone:
// those older than a job lives (its window and retention) are looked at,
// so that an entry whose job is being stored is never taken for one.
func (a *asyncJobs) sweepIndex(ctx context.Context) {
	owners, err := a.store.List(ctx, ownersPrefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			a.logger.Warn("listing the owners of async batches", zap.Error(err))
		}
		return
	}
	oldest := now().Add(-time.Duration(a.cfg.Window) - time.Duration(a.cfg.Retention))
	for _, dir := range owners {
		keys, err := a.store.List(ctx, dir, false)
		if err != nil {
			continue // gone meanwhile, or storage trouble: next time
		}
		if len(keys) == 0 {
			a.sweepOwnerDir(ctx, dir)
			continue
		}
		for _, k := range keys {
			if ctx.Err() != nil {
				return
			}
			name := path.Base(k)
			id, ok := indexEntryID(name)
			rev, _ := strconv.ParseInt(name[:min(19, len(name))], 10, 64)
			if ok && time.Unix(0, math.MaxInt64-rev).After(oldest) || ok && a.store.Exists(ctx, jobKey(id, "job")) {
				continue
			}
			if err := a.store.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
				a.logger.Warn("deleting an index entry without its job", zap.String("key", k), zap.Error(err))
			}
		}
	}
}
