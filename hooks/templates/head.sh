#!/bin/sh
# >>> gitlora managed hook <<< (do not edit: `gitlora install` rewrites it, `gitlora uninstall` removes it)
# gitlora @HOOK@ hook, template v2: runs the hook it replaced (if any) with the same arguments and stdin,
# then appends one line to gitlora's spool: @HOOK@ TAB new-oid TAB unix-time TAB old-oid TAB info.
# Never fails the git command: our own errors are discarded, the exit status is the chained hook's.
gitlora_spool=@SPOOL@
gitlora_chained=@CHAINED@
gitlora_repo=@REPO@
gitlora_status=0
if [ -n "$gitlora_chained" ] && [ -x "$gitlora_chained" ]; then
	"$gitlora_chained" "$@"
	gitlora_status=$?
fi
{
	# installed into a core.hooksPath dir (maybe shared by other repositories): spool only our repository
	if [ -n "$gitlora_repo" ]; then
		[ "$(git rev-parse --path-format=absolute --git-common-dir)" = "$gitlora_repo" ] || exit $gitlora_status
	fi
	gitlora_info=
	if [ @HOOK@ = post-merge ] && [ "$1" = 1 ]; then gitlora_info=squash; fi
	# Fast path, no process started (a `git rev-parse` costs ~2 ms, most of the hook): read HEAD and the
	# loose ref git has just written. Git runs this hook in the work tree's top, exporting GIT_DIR only for
	# linked worktrees (whose refs live in the common dir named by `commondir`). The time field stays empty:
	# sh has no clock without a process. Anything unusual takes the git path below.
	gitlora_oid=
	gitlora_dir=${GIT_DIR:-.git}
	if [ -z "$gitlora_repo" ] && [ -f "$gitlora_dir/HEAD" ] && read -r gitlora_head <"$gitlora_dir/HEAD"; then
		case $gitlora_head in
		"ref: refs/"*)
			gitlora_common=$gitlora_dir
			if [ -f "$gitlora_dir/commondir" ] && read -r gitlora_c <"$gitlora_dir/commondir"; then
				case $gitlora_c in /*) gitlora_common=$gitlora_c ;; *) gitlora_common=$gitlora_dir/$gitlora_c ;; esac
			fi
			[ -f "$gitlora_common/${gitlora_head#ref: }" ] && read -r gitlora_oid <"$gitlora_common/${gitlora_head#ref: }" ;;
		*) gitlora_oid=$gitlora_head ;;
		esac
		case $gitlora_oid in *[!0-9a-f]*) gitlora_oid= ;; esac
		[ ${#gitlora_oid} -eq 40 ] || [ ${#gitlora_oid} -eq 64 ] || gitlora_oid=
	fi
	if [ -n "$gitlora_oid" ]; then
		{ [ -d "${gitlora_spool%/*}" ] || mkdir -p "${gitlora_spool%/*}"; } &&
		printf '@HOOK@\t%s\t\t\t%s\n' "$gitlora_oid" "$gitlora_info" >>"$gitlora_spool"
		exit $gitlora_status
	fi
	# one process for both fields: prints "--max-age=<now>", the oid of HEAD, "--"
	gitlora_out=$(git rev-parse --since=now HEAD --) &&
	set -- $gitlora_out && [ -n "$2" ] &&
	{ [ -d "${gitlora_spool%/*}" ] || mkdir -p "${gitlora_spool%/*}"; } &&
	printf '@HOOK@\t%s\t%s\t\t%s\n' "$2" "${1#--max-age=}" "$gitlora_info" >>"$gitlora_spool"
} </dev/null >/dev/null 2>&1
exit $gitlora_status
